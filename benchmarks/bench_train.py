"""Reflow train-step throughput for the SD 1.5-size UNet (random weights) and its MFU.

The step is the trainer's own (``train_step`` with the reflow objective): frozen CLIP text
encoder, UNet forward and backward in ``--dtype``, float32 master weights, AdamW, grad clipping
and EMA. Model FLOPs use the issue's 2.41 TFLOP per sample per step at 512² (no remat) and are
cross-checked with XLA's cost analysis of the compiled step. Example (GPU):

    python benchmarks/bench_train.py --batch 16 --peak-tflops 989
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from instaflow_jax.models import CLIPTextConfig, CLIPTextModel, UNet2DConditionModel, UNetConfig
from instaflow_jax.precision import parse_dtype
from instaflow_jax.testing import random_params
from instaflow_jax.train.config import OptimizerConfig
from instaflow_jax.train.objectives import make_reflow_loss
from instaflow_jax.train.state import create_state, make_optimizer, train_step

PAPER_FLOPS_PER_SAMPLE = 2.41e12  # at 512², forward + backward, no remat
PEAKS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v5": 459.0, "TPU v4": 275.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--attention", default="auto", help="attention implementation (models/attention.py)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--peak-tflops", type=float, default=0.0, help="device peak for MFU (default: by name)"
    )
    args = parser.parse_args()

    dtype = parse_dtype(args.dtype)
    modules = {
        "unet": UNet2DConditionModel(
            UNetConfig(), dtype=dtype, remat=args.remat, attention_impl=args.attention
        ),
        "text_encoder": CLIPTextModel(CLIPTextConfig(), dtype=dtype, attention_impl=args.attention),
    }
    unet_params = random_params(modules["unet"], "unet", 0)
    frozen = {
        "text_encoder": jax.tree.map(jnp.asarray, random_params(modules["text_encoder"], "text_encoder", 1)),
        "uncond_ids": jnp.zeros((1, 77), jnp.int32),
    }
    optimizer, schedule = make_optimizer(OptimizerConfig(learning_rate=1e-6, warmup_steps=0), 1000)
    state = create_state(unet_params, optimizer)
    del unet_params
    side = args.resolution // 8
    rng = np.random.default_rng(0)
    batch = {
        "x0": jnp.asarray(rng.standard_normal((args.batch, side, side, 4)), jnp.float32),
        "x1": jnp.asarray(rng.standard_normal((args.batch, side, side, 4)), jnp.float32),
        "ids": jnp.asarray(rng.integers(0, 49407, (args.batch, 77)), jnp.int32),
    }
    step = jax.jit(
        functools.partial(
            train_step,
            loss_fn=make_reflow_loss(modules),
            optimizer=optimizer,
            schedule=schedule,
            ema_decay=0.9999,
            grad_accum=1,
            seed=0,
        ),
        donate_argnums=(0,),
    )
    start = time.perf_counter()
    compiled = step.lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    xla_flops = float((cost[0] if isinstance(cost, list) else cost).get("flops", float("nan")))
    state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = compiled(state, frozen, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    device = jax.devices()[0].device_kind
    model_flops = PAPER_FLOPS_PER_SAMPLE * args.batch * (args.resolution / 512) ** 2
    peak = args.peak_tflops or next((v for k, v in PEAKS.items() if k in device), 0.0)
    rate = args.batch / seconds
    achieved = model_flops / seconds / 1e12
    mfu = f", MFU {achieved / peak:.1%} of {peak:.0f}" if peak else " (give --peak-tflops for MFU)"
    print(f"# {device}, jax {jax.__version__}, {args.dtype}, {args.resolution}², batch {args.batch}")
    print(f"remat {args.remat}, attention {args.attention}; compile {compile_s:.1f} s; step {seconds:.3f} s")
    print(
        f"{rate:.3f} samples/s; model FLOPs/step {model_flops / 1e12:.2f} T (XLA: {xla_flops / 1e12:.2f} T)"
    )
    print(f"achieved {achieved:.2f} TFLOP/s{mfu}")
    print(f"loss {float(metrics['loss']):.4f} (finite: {bool(np.isfinite(float(metrics['loss'])))})")


if __name__ == "__main__":
    main()
