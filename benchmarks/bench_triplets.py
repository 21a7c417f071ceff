"""Teacher-triplet throughput for the SD 1.5-size teacher (random weights) and a days projection.

Times the compiled generation program of ``generate_triplets`` (text encoder, DPM-Solver++ with
CFG, latents out) at ``--steps-probe`` step counts, fits ``seconds = a + b · steps`` and reports
triplets/s at ``--steps`` (25 in the paper). XLA's own FLOP count of one UNet evaluation gives a
device-independent projection of accelerator-days for ``--num-triplets`` (1.6 M in the paper,
which reports 16 A100-days for this stage's data). Example (GPU):

    python benchmarks/bench_triplets.py --batch 16 --steps-probe 5 10
"""

from __future__ import annotations

import argparse
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
from instaflow_jax.sampling.text_to_image import SamplerSpec, make_generate_fn
from instaflow_jax.testing import random_params
from instaflow_jax.weights.pipeline_folder import DEFAULT_SCHEDULER_CONFIG as SD_SCHEDULER_CONFIG

PEAK_BF16_TFLOPS = {"A100": 312.0, "H100": 989.0}  # dense bf16 tensor-core peaks


def unet_flops(unet, params, batch: int, side: int) -> float:
    """FLOPs of one UNet evaluation on ``batch`` latents, from XLA's cost analysis."""
    fn = jax.jit(lambda p, x, c: unet.apply({"params": p}, x, 1000.0, c))
    args = (params, jnp.zeros((batch, side, side, 4), unet.dtype), jnp.zeros((batch, 77, 768), unet.dtype))
    cost = fn.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", float("nan")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--steps-probe", type=int, nargs=2, default=[1, 3])
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--num-triplets", type=float, default=1.6e6)
    parser.add_argument(
        "--mfu", type=float, default=0.4, help="assumed model-FLOPs utilisation for the projection"
    )
    args = parser.parse_args()

    dtype = parse_dtype(args.dtype)
    modules = {
        "unet": UNet2DConditionModel(UNetConfig(), dtype=dtype),
        "vae": AutoencoderKL(VAEConfig(), dtype=dtype),
        "text_encoder": CLIPTextModel(CLIPTextConfig(), dtype=dtype),
    }
    params = {
        k: jax.tree.map(lambda x: jnp.asarray(x, dtype), random_params(m, k, i))
        for i, (k, m) in enumerate(modules.items())
    }
    side = args.resolution // 8
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 49407, (args.batch, 77)), jnp.int32)
    z0 = jax.random.normal(jax.random.key(0), (args.batch, side, side, 4))
    seconds = {}
    for steps in args.steps_probe:
        fn = jax.jit(
            make_generate_fn(modules, SamplerSpec(steps, "dpmpp2m", True, "latent"), SD_SCHEDULER_CONFIG)
        )
        jax.block_until_ready(fn(params, ids, ids, z0, args.guidance))  # compile
        start = time.perf_counter()
        jax.block_until_ready(fn(params, ids, ids, z0, args.guidance))
        seconds[steps] = time.perf_counter() - start
        print(f"{steps:3d} steps, batch {args.batch}: {seconds[steps]:.2f} s", flush=True)
    (n1, t1), (n2, t2) = sorted(seconds.items())
    per_step = (t2 - t1) / (n2 - n1)
    fixed = t1 - per_step * n1
    per_batch = fixed + per_step * args.steps
    rate = args.batch / per_batch
    device = jax.devices()[0].device_kind
    print(f"# {device}, jax {jax.__version__}, {args.dtype}, {args.resolution}², CFG {args.guidance}")
    print(f"fit: {fixed:.2f} s + {per_step:.2f} s/step per batch of {args.batch}")
    print(f"{args.steps}-step teacher: {rate:.4f} triplets/s on this device")
    print(f"{args.num_triplets:.3g} triplets: {args.num_triplets / rate / 86400:.1f} days of this device")
    flops = unet_flops(modules["unet"], params["unet"], 1, side)
    per_triplet = flops * 2 * args.steps  # CFG: two UNet evaluations per step
    print(f"UNet forward: {flops / 1e12:.3f} TFLOP per sample (XLA cost analysis)")
    print(f"teacher: {per_triplet / 1e12:.1f} TFLOP per triplet ({args.steps} steps × 2 for CFG)")
    for name, peak in PEAK_BF16_TFLOPS.items():
        days = args.num_triplets * per_triplet / (peak * 1e12 * args.mfu) / 86400
        assumption = f"{args.mfu:.0%} MFU of {peak:.0f} TFLOP/s bf16"
        print(f"projection ({assumption}): {days:.1f} {name}-days (paper: 16 A100-days)")


if __name__ == "__main__":
    main()
