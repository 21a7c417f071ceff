"""What the paper's COCO 2017 5k evaluation (generation + FID Inception + CLIP score) costs per device.

``instaflow-eval --protocol coco2017-5k`` runs one jitted program per batch: generation (SD 1.5-size
text encoder, UNet, VAE decode at 512²) → FID's Inception-v3 pool features of the 512² image
(resized to 299² inside) → CLIP ViT-g/14 cosine of image (preprocessed to 224²) and caption (77
tokens). This script

1. counts the FLOPs per image of each part by XLA's own accounting (``cost_analysis()`` of the
   compiled program; compile only, every input a ``jax.ShapeDtypeStruct``, nothing allocated);
2. times FID Inception and CLIP ViT-g/14 (image + text) on this machine (float32, zero weights:
   speed does not depend on the values; CLIP is skipped with a reason when its 5.5 GB of float32
   weights do not fit in the available memory). CPU generation is not re-measured: it is taken
   from ``benchmarks/RESULTS.md`` (2026-11-22, JAX fp32, batch 1);
3. prints, per protocol row of the paper (InstaFlow one step; 2-RF 25 Euler steps with CFG; SD 1.5
   25 DPM-Solver++ steps with CFG) and per device, seconds per image and hours for 5,000 images.

The multi-step rows are per-part FLOPs times the number of evaluations (2 text encodings and 2
UNet passes per step with CFG, one VAE decode): the samplers loop with ``lax.scan`` and XLA's cost
analysis counts a loop body once, so compiling a 25-step program would not count 25 steps. The
solver's own element-wise updates are left out (under 0.01 % of a UNet pass). The fused one-step
program (``make_generate_fn``, no loop to undercount) is compiled too, as a check that the parts
add up to what ``instaflow-eval`` jits. FLOPs are counted with the materialised (``xla``)
attention: the blockwise one (CPU's default for the large layers) also loops with ``lax.scan``.

Accelerator rows are projections, not measurements: FLOPs / (peak × ``--mfu``), with each part at
the peak of the precision ``instaflow-eval`` runs it in: generation bfloat16 (``--dtype auto``),
CLIP float32 at default matmul precision (TF32 on A100/H100, one bfloat16 pass on TPU), Inception
float32 at ``HIGHEST`` (true FP32 on GPUs, six bfloat16 passes on TPU). Example:

    python benchmarks/bench_eval.py --mfu 0.4
    python benchmarks/bench_eval.py --skip-cpu   # FLOP projections only (a minute or two)
"""

from __future__ import annotations

import argparse
import gc
import time

import jax
import jax.numpy as jnp
import numpy as np

from instaflow_jax.evaluation.clip_score import clip_cosine, clip_preprocess
from instaflow_jax.models import (
    AutoencoderKL,
    CLIPTextConfig,
    CLIPTextModel,
    UNet2DConditionModel,
    UNetConfig,
    VAEConfig,
)
from instaflow_jax.models.clip_vision import CLIPConfig, CLIPModel, get_image_features, get_text_features
from instaflow_jax.models.inception import abstract_params as inception_abstract_params
from instaflow_jax.models.inception import inception_features
from instaflow_jax.sampling.text_to_image import SamplerSpec, decode_latents, encode_text, make_generate_fn

S = jax.ShapeDtypeStruct
RESOLUTION = 512  # coco2017-5k: generated at 512², Inception fed 512² (fid_size), CLIP at 224²
TOKENS = 77

# The paper's CLIP: laion/CLIP-ViT-g-14-laion2B-s12B-b42K (its config.json, the keys that set sizes).
VIT_G14_CONFIG = {
    "architectures": ["CLIPModel"],
    "model_type": "clip",
    "projection_dim": 1024,
    "text_config": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "vocab_size": 49408,
        "max_position_embeddings": TOKENS,
        "hidden_act": "gelu",
    },
    "vision_config": {
        "hidden_size": 1408,
        "intermediate_size": 6144,
        "num_attention_heads": 16,
        "num_hidden_layers": 40,
        "patch_size": 14,
        "image_size": 224,
        "hidden_act": "gelu",
    },
}

# Dense peaks in TFLOP/s: (bfloat16, float32 matmul at DEFAULT precision, float32 at HIGHEST).
# DEFAULT float32 is TF32 on A100/H100 and one bfloat16 pass on TPU; HIGHEST is FP32 (CUDA cores)
# on GPUs and six bfloat16 passes on TPU. H100: SXM.
PEAKS = {
    "A100": (312.0, 156.0, 19.5),
    "H100": (989.0, 494.5, 66.9),
    "TPU v5e": (197.0, 197.0, 197.0 / 6),
}

# CPU generation (benchmarks/RESULTS.md, 2026-11-22, `bench_generate.py --batches 1 --dtype float32`,
# JAX, batch 1, 2-core Intel Xeon VM): seconds.
CPU_GENERATION = {"one step (fused)": 22.983, "text": 0.101, "unet": 10.387, "vae": 14.472}

# The paper's rows (coco2017-5k): evaluations per image of text encoder, UNet and VAE decoder.
PROTOCOLS = [
    ("InstaFlow-0.9B, 1 Euler step", {"text": 1, "unet": 1, "vae": 1}),
    ("2-RF, 25 Euler steps, CFG 1.5", {"text": 2, "unet": 50, "vae": 1}),
    ("SD 1.5, 25 DPM-Solver++ steps, CFG", {"text": 2, "unet": 50, "vae": 1}),
]


def xla_flops(fn, *args) -> float:
    """FLOPs of ``jax.jit(fn)(*args)`` by XLA's cost analysis (compile only)."""
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per partition
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


def abstract(module, *inputs):
    """The module's param tree as ``ShapeDtypeStruct`` leaves (nothing computed or allocated)."""
    return jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"]


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def clip_model(attention: str) -> CLIPModel:
    return CLIPModel(CLIPConfig.from_dict(VIT_G14_CONFIG, source="ViT-g/14"), attention_impl=attention)


def clip_abstract(model: CLIPModel):
    side = model.config.vision.image_size
    return abstract(model, S((1, TOKENS), jnp.int32), S((1, side, side, 3), jnp.float32))


def part_flops() -> tuple[dict[str, float], dict[str, int]]:
    """Per-image FLOPs of each part (batch 1) and the parameter counts, by XLA's accounting."""
    flops, params, sd, sd_params = {}, {}, {}, {}
    latent = RESOLUTION // 8
    image = S((1, RESOLUTION, RESOLUTION, 3), jnp.float32)
    ids = S((1, TOKENS), jnp.int32)

    text = CLIPTextModel(CLIPTextConfig(), attention_impl="xla")
    p = abstract(text, S((1, 1), jnp.int32))
    params["text"], sd["text_encoder"], sd_params["text_encoder"] = count(p), text, p
    flops["text"] = xla_flops(lambda p, i: encode_text(text, p, i), p, ids)

    unet = UNet2DConditionModel(UNetConfig(), attention_impl="xla")
    p = abstract(unet, S((1, 8, 8, 4), jnp.float32), S((1,), jnp.float32), S((1, 1, 768), jnp.float32))
    params["unet"], sd["unet"], sd_params["unet"] = count(p), unet, p
    z, context = S((1, latent, latent, 4), jnp.float32), S((1, TOKENS, 768), jnp.float32)
    flops["unet"] = xla_flops(
        lambda p, z, c: unet.apply({"params": p}, z, jnp.full((1,), 999.0), c), p, z, context
    )

    vae = AutoencoderKL(VAEConfig(), attention_impl="xla")
    p = abstract(vae, S((1, 8, 8, 3), jnp.float32))
    params["vae"], sd["vae"], sd_params["vae"] = count(p), vae, p
    flops["vae"] = xla_flops(
        lambda p, z: decode_latents(vae, p, z), p, S((1, latent, latent, 4), jnp.float32)
    )

    # Cross-check: the fused one-step program (what instaflow-eval jits) against the sum of parts.
    generate = make_generate_fn(sd, SamplerSpec(1, "euler", False, "image"))
    z0 = S((1, latent, latent, 4), jnp.float32)
    flops["fused one step"] = xla_flops(lambda p, i, z: generate(p, i, None, z, 0.0), sd_params, ids, z0)

    p = inception_abstract_params()
    params["inception"] = count(p)
    flops["inception"] = xla_flops(inception_features, p, image)

    model = clip_model("xla")
    p = clip_abstract(model)
    params["clip"] = count(p)
    side = model.config.vision.image_size
    image_fn = lambda p, x: get_image_features(model, p, clip_preprocess(x, side))
    flops["clip image"] = xla_flops(image_fn, p, image)
    flops["clip text"] = xla_flops(lambda p, i: get_text_features(model, p, i), p, ids)
    return flops, params


def median_time(fn, iters: int, *args) -> float:
    jax.block_until_ready(fn(*args))  # compile / warm up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def zeros(tree):
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)


def available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cpu_scoring(batch: int, iters: int) -> tuple[dict[str, float], dict[str, str]]:
    """Seconds per image of FID Inception and CLIP image + text on this machine (float32)."""
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.random((batch, RESOLUTION, RESOLUTION, 3), np.float32))
    ids = jnp.asarray(rng.integers(0, 49407, (batch, TOKENS)), jnp.int32)
    seconds, skipped = {}, {}

    params = zeros(inception_abstract_params())
    fid = jax.jit(inception_features)
    seconds["inception"] = median_time(fid, iters, params, images) / batch
    del params

    model = clip_model("auto")
    shapes = clip_abstract(model)
    need, free = int(nbytes(shapes) * 1.3) + (2 << 30), available_bytes()
    if free is not None and free < need:
        skipped["clip"] = (
            f"needs ≈ {need / 2**30:.1f} GiB ({nbytes(shapes) / 2**30:.1f} GiB of float32 weights), "
            f"{free / 2**30:.1f} GiB available"
        )
        return seconds, skipped
    params = zeros(shapes)
    side = model.config.vision.image_size

    @jax.jit
    def clip_fn(p, x, i):
        image_embeds = get_image_features(model, p, clip_preprocess(x, side))
        return clip_cosine(image_embeds, get_text_features(model, p, i))

    seconds["clip"] = median_time(clip_fn, iters, params, images, ids) / batch
    del params
    gc.collect()
    return seconds, skipped


def generation_flops(flops: dict[str, float], uses: dict[str, int]) -> float:
    return sum(flops[k] * n for k, n in uses.items())


def cpu_generation_seconds(uses: dict[str, int]) -> tuple[float, str]:
    if uses == {"text": 1, "unet": 1, "vae": 1}:
        return CPU_GENERATION["one step (fused)"], "measured"
    return sum(CPU_GENERATION[k] * n for k, n in uses.items()), "extrapolated"


def projected_seconds(flops: dict[str, float], uses: dict[str, int], peaks, mfu: float) -> float:
    bf16, fp32_default, fp32_highest = (peak * 1e12 * mfu for peak in peaks)
    clip = flops["clip image"] + flops["clip text"]
    return generation_flops(flops, uses) / bf16 + clip / fp32_default + flops["inception"] / fp32_highest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed model-FLOPs utilisation.")
    parser.add_argument("--num-images", type=int, default=5000, help="images of the protocol.")
    parser.add_argument("--batch", type=int, default=4, help="batch of the CPU timings.")
    parser.add_argument("--iters", type=int, default=3, help="timed runs (median) after a warm-up.")
    parser.add_argument("--skip-cpu", action="store_true", help="FLOP projections only.")
    args = parser.parse_args()

    print(f"# jax {jax.__version__} on {jax.devices()[0].device_kind}; coco2017-5k, {RESOLUTION}²")
    start = time.perf_counter()
    flops, params = part_flops()
    print(f"# FLOP counts compiled in {time.perf_counter() - start:.0f} s\n")
    print("| part (per image) | parameters | XLA GFLOP |")
    print("|---|---|---|")
    names = {
        "text": "SD 1.5 text encoder (77 tokens)",
        "unet": "SD 1.5 UNet, one evaluation (64×64 latent)",
        "vae": "SD 1.5 VAE decode (→ 512²)",
        "inception": "FID Inception-v3 (512² → 299², pool features)",
        "clip image": "CLIP ViT-g/14 image: preprocess 512² → 224², tower, projection",
        "clip text": "CLIP ViT-g/14 text: 77 tokens, tower, projection",
    }
    owner = {"clip image": "clip", "clip text": "clip"}
    for key, name in names.items():
        shared = " (whole CLIP)" if key in owner else ""
        print(f"| {name} | {params[owner.get(key, key)] / 1e6:,.1f} M{shared} | {flops[key] / 1e9:,.1f} |")
    scoring = flops["inception"] + flops["clip image"] + flops["clip text"]
    for name, uses in PROTOCOLS:
        gen = generation_flops(flops, uses)
        print(f"| generation: {name} | | {gen / 1e9:,.1f} |")
    print(f"| scoring: Inception + CLIP image + CLIP text | | {scoring / 1e9:,.1f} |")
    fused, parts = flops["fused one step"], generation_flops(flops, PROTOCOLS[0][1])
    print(
        f"\n# cross-check: fused one-step generate program {fused / 1e9:,.1f} GFLOP, sum of its parts "
        f"{parts / 1e9:,.1f} GFLOP"
    )

    cpu, skipped = {}, {}
    if not args.skip_cpu:
        start = time.perf_counter()
        cpu, skipped = cpu_scoring(args.batch, args.iters)
        print(
            f"\n# CPU timings (float32, batch {args.batch}, median of {args.iters}) in "
            f"{time.perf_counter() - start:.0f} s"
        )
        print("\n| part | this CPU ms / image |")
        print("|---|---|")
        print(f"| FID Inception-v3 (512²) | {cpu['inception'] * 1e3:,.0f} |")
        if "clip" in cpu:
            print(f"| CLIP ViT-g/14 image + text + cosine | {cpu['clip'] * 1e3:,.0f} |")
        for name, reason in skipped.items():
            print(f"| {name}: skipped ({reason}) | — |")

    n = args.num_images
    print(f"\n| protocol | device | how | s / image | hours for {n:,} images |")
    print("|---|---|---|---|---|")
    for name, uses in PROTOCOLS:
        if cpu:
            gen, how = cpu_generation_seconds(uses)
            seconds = gen + cpu["inception"] + cpu.get("clip", 0.0)
            how = f"generation {how} (RESULTS.md 2026-11-22), Inception measured"
            how += ", CLIP measured" if "clip" in cpu else ", CLIP not included"
            print(f"| {name} | this CPU, fp32 | {how} | {seconds:,.1f} | {seconds * n / 3600:,.1f} |")
        for device, peaks in PEAKS.items():
            seconds = projected_seconds(flops, uses, peaks, args.mfu)
            how = f"projected, {args.mfu:.0%} MFU"
            print(f"| {name} | {device} | {how} | {seconds:.3f} | {seconds * n / 3600:.2f} |")
    reference = [
        f"{device} {flops['inception'] * n / (PEAKS[device][2] * 1e12 * args.mfu):.1f} s" for device in PEAKS
    ]
    if cpu:
        reference.insert(0, f"this CPU {cpu['inception'] * n / 3600:.2f} h (measured Inception)")
    print(
        f"\n# plus once per protocol (cached): reference statistics, {n:,} Inception passes on the COCO "
        f"images: {'; '.join(reference)}"
    )
    for name, reason in skipped.items():
        print(f"# skipped on this CPU: {name} ({reason})")


if __name__ == "__main__":
    main()
