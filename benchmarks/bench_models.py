"""SD 1.5-size UNet forward and VAE decode: our Flax ports vs PyTorch diffusers, same machine.

Random weights (speed does not depend on them), the same weights in both frameworks. Prints one
line per (network, dtype, framework) and the PyTorch/JAX time ratio. Example:

    python benchmarks/bench_models.py --resolution 512 --batch 1 --dtypes float32 bfloat16 --iters 3

Needs the ``test`` extra (torch, diffusers). Use ``--skip-torch`` for JAX alone.
"""

from __future__ import annotations

import argparse
import functools
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from instaflow_jax.models import AutoencoderKL, UNet2DConditionModel, UNetConfig, VAEConfig
from instaflow_jax.precision import parse_dtype
from instaflow_jax.testing import random_params
from instaflow_jax.weights.convert import flatten, flax_to_torch


def time_call(fn, iters: int) -> tuple[float, float]:
    """(first call seconds, median of ``iters`` further calls)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, float(np.median(times))


def bench_jax(net: str, module, params, inputs, dtype, iters: int) -> tuple[float, float]:
    params = jax.tree.map(lambda x: jnp.asarray(x, parse_dtype(dtype)), params)
    if net == "unet":
        fn = jax.jit(lambda p, x, t, c: module.apply({"params": p}, x, t, c))
    else:
        fn = jax.jit(functools.partial(module.apply, method="decode"))
        fn = functools.partial(lambda f, p, z: f({"params": p}, z), fn)
    return time_call(lambda: jax.block_until_ready(fn(params, *inputs)), iters)


def bench_torch(net: str, params, inputs, dtype: str, iters: int) -> tuple[float, float]:
    import torch
    from diffusers import AutoencoderKL as TorchVAE
    from diffusers import UNet2DConditionModel as TorchUNet

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    family = "unet" if net == "unet" else "vae"
    state = flax_to_torch(flatten(params), family)
    state = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in state.items()}
    model = (TorchUNet if net == "unet" else TorchVAE)(**torch_kwargs(CONFIGS[net]))
    model.load_state_dict(state)
    model = model.to(torch_dtype).eval()
    to_nchw = lambda x: torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()).to(torch_dtype)
    if net == "unet":
        x, t, c = inputs
        args = (to_nchw(x), torch.from_numpy(np.asarray(t)), torch.from_numpy(np.asarray(c)).to(torch_dtype))
        call = lambda: model(*args).sample
    else:
        z = to_nchw(inputs[0])
        call = lambda: model.decode(z).sample
    with torch.inference_mode():
        return time_call(call, iters)


CONFIGS = {"unet": UNetConfig(), "vae": VAEConfig()}  # SD 1.5 sizes


def torch_kwargs(config) -> dict:
    """Our config as keyword arguments of the diffusers PyTorch class."""
    return {k: v for k, v in config.to_dict().items() if not k.startswith("_")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--nets", nargs="+", default=["unet", "vae"], choices=["unet", "vae"])
    parser.add_argument("--skip-torch", action="store_true")
    args = parser.parse_args()

    side = args.resolution // 8
    rng = np.random.default_rng(0)
    device = jax.devices()[0]
    print(f"# device: {device.device_kind} ({jax.default_backend()}), host: {platform.processor()}")
    print(f"# jax {jax.__version__}; {args.resolution}², batch {args.batch}; median of {args.iters}")
    print(f"{'net':5} {'dtype':9} {'framework':9} {'first call s':>12} {'median s':>9} {'torch/jax':>9}")
    for net in args.nets:
        if net == "unet":
            module = UNet2DConditionModel(UNetConfig())
            inputs = (
                rng.standard_normal((args.batch, side, side, 4)).astype(np.float32),
                np.full((args.batch,), 1000.0, np.float32),
                rng.standard_normal((args.batch, 77, 768)).astype(np.float32),
            )
        else:
            module = AutoencoderKL(VAEConfig())
            inputs = (rng.standard_normal((args.batch, side, side, 4)).astype(np.float32),)
        params = random_params(module, net, seed=0)
        for dtype in args.dtypes:
            typed = module.clone(dtype=parse_dtype(dtype))
            first, median = bench_jax(net, typed, params, inputs, dtype, args.iters)
            print(f"{net:5} {dtype:9} {'jax':9} {first:12.3f} {median:9.3f}", flush=True)
            if not args.skip_torch:
                t_first, t_median = bench_torch(net, params, inputs, dtype, args.iters)
                ratio = t_median / median
                row = f"{net:5} {dtype:9} {'torch':9} {t_first:12.3f} {t_median:9.3f} {ratio:9.2f}"
                print(row, flush=True)


if __name__ == "__main__":
    main()
