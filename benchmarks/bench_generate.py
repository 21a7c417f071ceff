"""One-step 512² generation with SD 1.5-size random weights: latency and throughput.

Times the text encoder, the UNet step and the VAE decode separately and the fused end-to-end
program (what ``Pipeline.generate`` runs), then the same one step with PyTorch diffusers /
transformers eager on the same weights and device. Example (GPU):

    python benchmarks/bench_generate.py --batches 1 8 64 --dtype bfloat16 --torch-dtype float16

``--attention`` picks the JAX attention implementation (``instaflow_jax.models.attention``;
default ``auto``). ``--profile-dir DIR`` also records a ``jax.profiler`` trace of ``--iters`` fused
end-to-end generations per batch size (after the timed runs) under ``DIR/plugins/profile/``:
``tensorboard --logdir DIR`` (with ``tensorboard-plugin-profile``) or ui.perfetto.dev on its
``*.trace.json.gz``.

Speed does not depend on the weights' values, so no checkpoint is needed.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from instaflow_jax.models import (
    AutoencoderKL,
    CLIPTextConfig,
    CLIPTextModel,
    UNet2DConditionModel,
    UNetConfig,
    VAEConfig,
)
from instaflow_jax.precision import parse_dtype
from instaflow_jax.sampling.euler import one_step
from instaflow_jax.sampling.text_to_image import SamplerSpec, decode_latents, encode_text, make_generate_fn
from instaflow_jax.sampling.velocity import unet_field
from instaflow_jax.testing import random_params
from instaflow_jax.weights.convert import flatten, flax_to_torch

CONFIGS = {"unet": UNetConfig(), "vae": VAEConfig(), "text_encoder": CLIPTextConfig()}
MODULES = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}


def median_time(fn, iters: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def jax_rows(
    params, modules, batch: int, side: int, iters: int, profile_dir: str | None = None
) -> dict[str, float]:
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 49407, (batch, 77)), jnp.int32)
    z0 = jax.random.normal(jax.random.key(0), (batch, side, side, 4))
    text = jax.jit(functools.partial(encode_text, modules["text_encoder"]))
    step = jax.jit(lambda p, c, z: one_step(unet_field(modules["unet"], p, c), z))
    decode = jax.jit(functools.partial(decode_latents, modules["vae"]))
    full = jax.jit(make_generate_fn(modules, SamplerSpec(1, "euler", False, "image")))
    context = text(params["text_encoder"], ids)
    latents = step(params["unet"], context, z0)
    sync = jax.block_until_ready
    rows = {
        "text encoder": median_time(lambda: sync(text(params["text_encoder"], ids)), iters),
        "unet step": median_time(lambda: sync(step(params["unet"], context, z0)), iters),
        "vae decode": median_time(lambda: sync(decode(params["vae"], latents)), iters),
        "end to end (fused)": median_time(lambda: sync(full(params, ids, None, z0, 0.0)), iters),
    }
    if profile_dir:  # compiled and warm by now: the trace holds generation only
        trace_generation(full, params, ids, z0, iters, profile_dir)
    return rows


def trace_generation(full, params, ids, z0, iters: int, profile_dir: str) -> None:
    """A ``jax.profiler`` trace of ``iters`` calls of the jitted generate ``full`` (one step per
    call, named ``generate_batch_B``) under ``profile_dir/plugins/profile/``, plus a Perfetto file."""
    with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
        for i in range(iters):
            with jax.profiler.StepTraceAnnotation(f"generate_batch_{ids.shape[0]}", step_num=i):
                jax.block_until_ready(full(params, ids, None, z0, 0.0))


def torch_models(params, device: str, dtype_name: str) -> dict:
    """PyTorch diffusers/transformers text encoder, UNet and VAE (SD 1.5 sizes) holding ``params``."""
    import torch
    from diffusers import AutoencoderKL as TorchVAE
    from diffusers import UNet2DConditionModel as TorchUNet
    from transformers import CLIPTextConfig as TorchCLIPConfig
    from transformers import CLIPTextModel as TorchCLIP

    dtype = getattr(torch, dtype_name)

    def build(kind, cls, **config):
        model = cls(**config) if kind != "text_encoder" else cls(TorchCLIPConfig(**config))
        family = {"unet": "unet", "vae": "vae", "text_encoder": "clip"}[kind]
        state = flax_to_torch(flatten(params[kind]), family)
        own = set(model.state_dict())
        state = {  # transformers ≥ 5 names CLIPTextModel weights without the text_model. prefix
            (k if k in own else k.removeprefix("text_model.")): torch.from_numpy(np.asarray(v, np.float32))
            for k, v in state.items()
        }
        model.load_state_dict(state, strict=not any(k.endswith("position_ids") for k in own))
        return model.to(device, dtype).eval()

    plain = lambda c: {k: v for k, v in c.to_dict().items() if not k.startswith("_")}
    text_config = CONFIGS["text_encoder"].to_dict()
    text_config = {k: v for k, v in text_config.items() if k not in ("architectures", "model_type")}
    return {
        "unet": build("unet", TorchUNet, **plain(CONFIGS["unet"])),
        "vae": build("vae", TorchVAE, **plain(CONFIGS["vae"])),
        "text_encoder": build("text_encoder", TorchCLIP, **text_config),
    }


def torch_rows(params, batch: int, side: int, iters: int, dtype_name: str) -> dict[str, float]:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, dtype_name)
    models = torch_models(params, device, dtype_name)
    unet, vae, text = models["unet"], models["vae"], models["text_encoder"]
    ids = torch.randint(0, 49407, (batch, 77), device=device)
    z0 = torch.randn(batch, 4, side, side, device=device, dtype=dtype)
    t = torch.full((batch,), 1000.0, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed(fn):
        def run():
            fn()
            sync()

        return run

    with torch.inference_mode():
        context = text(ids)[0]
        latents = z0 + unet(z0, t, context).sample
        rows = {
            "text encoder": median_time(timed(lambda: text(ids)[0]), iters),
            "unet step": median_time(timed(lambda: z0 + unet(z0, t, context).sample), iters),
            "vae decode": median_time(timed(lambda: vae.decode(latents / 0.18215).sample), iters),
        }

        def end_to_end():
            c = text(ids)[0]
            z = z0 + unet(z0, t, c).sample
            return (vae.decode(z / 0.18215).sample / 2 + 0.5).clamp(0, 1)

        rows["end to end (eager)"] = median_time(timed(end_to_end), iters)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--dtype", default="bfloat16", help="JAX compute dtype (params are cast too).")
    parser.add_argument("--torch-dtype", default=None, help="default: float16 on CUDA, bfloat16 on CPU.")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--attention", default="auto", help="JAX attention implementation.")
    parser.add_argument(
        "--profile-dir",
        default=None,
        help="also write a jax.profiler trace of the fused generation here (TensorBoard/Perfetto).",
    )
    args = parser.parse_args()

    dtype = parse_dtype(args.dtype)
    modules = {k: MODULES[k](CONFIGS[k], dtype=dtype, attention_impl=args.attention) for k in MODULES}
    params = {k: random_params(modules[k], k, seed=i) for i, k in enumerate(modules)}
    device_params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
    side = args.resolution // 8
    device = jax.devices()[0].device_kind
    setting = f"{args.resolution}², one step, {args.dtype}, attention {args.attention}"
    print(f"# jax {jax.__version__} on {device}; {setting}")
    for batch in args.batches:
        rows = jax_rows(device_params, modules, batch, side, args.iters, args.profile_dir)
        torch_dtype = None
        if not args.skip_torch:
            import torch

            torch_dtype = args.torch_dtype or ("float16" if torch.cuda.is_available() else "bfloat16")
            reference = torch_rows(params, batch, side, args.iters, torch_dtype)
        for name, seconds in rows.items():
            rate = batch / seconds
            line = f"batch {batch:3d}  {name:20s} jax {seconds * 1000:10.1f} ms ({rate:7.2f} img/s)"
            ref = None
            if torch_dtype is not None:
                ref = reference.get(name) or reference.get(name.replace("fused", "eager"))
            if ref:
                line += f"   torch {torch_dtype} {ref * 1000:10.1f} ms   speed-up {ref / seconds:5.2f}×"
            print(line, flush=True)
    if args.profile_dir:
        print(f"# profiler traces in {args.profile_dir}/plugins/profile/ (view: tensorboard --logdir DIR)")


if __name__ == "__main__":
    main()
