"""SD 1.5-size UNet forward and VAE decode: our Flax ports vs PyTorch diffusers, same machine.

Random weights (speed does not depend on them), the same weights in both frameworks. Prints one
line per (network, dtype, framework) and the PyTorch/JAX time ratio. Example:

    python benchmarks/bench_models.py --resolution 512 --batch 1 --dtypes float32 bfloat16 --iters 3

``--attention xla blockwise`` times the JAX networks once per attention implementation
(``instaflow_jax.models.attention``; default ``auto``). The JAX variants and PyTorch alternate
round by round, so a machine shared with other work slows them alike. Needs the ``test`` extra
(torch, diffusers). Use ``--skip-torch`` for JAX alone.
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


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(calls: dict, rounds: int) -> tuple[dict, dict]:
    """(first-call seconds, per-round seconds) of each call, the calls alternating round by round
    so that a machine shared with other work slows every framework alike."""
    first = {name: timed(call) for name, call in calls.items()}
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            times[name].append(timed(call))
    return first, times


def jax_call(net: str, module, params, inputs, dtype):
    params = jax.tree.map(lambda x: jnp.asarray(x, parse_dtype(dtype)), params)
    if net == "unet":
        fn = jax.jit(lambda p, x, t, c: module.apply({"params": p}, x, t, c))
    else:
        fn = jax.jit(functools.partial(module.apply, method="decode"))
        fn = functools.partial(lambda f, p, z: f({"params": p}, z), fn)
    return lambda: jax.block_until_ready(fn(params, *inputs))


def torch_call(net: str, params, inputs, dtype: str):
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
        forward = lambda: model(*args).sample
    else:
        z = to_nchw(inputs[0])
        forward = lambda: model.decode(z).sample

    def call():
        with torch.inference_mode():
            forward()

    return call


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
    parser.add_argument("--attention", nargs="+", default=["auto"], help="JAX attention implementations.")
    args = parser.parse_args()

    side = args.resolution // 8
    rng = np.random.default_rng(0)
    device = jax.devices()[0]
    print(f"# device: {device.device_kind} ({jax.default_backend()}), host: {platform.processor()}")
    print(f"# jax {jax.__version__}; {args.resolution}², batch {args.batch}; median of {args.iters} rounds")
    print("# each round runs every JAX variant and PyTorch once; torch/jax = median of per-round ratios")
    print(f"{'net':5} {'dtype':9} {'framework':15} {'first call s':>12} {'median s':>9} {'torch/jax':>9}")
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
            calls = {}
            for impl in args.attention:
                typed = module.clone(dtype=parse_dtype(dtype), attention_impl=impl)
                calls[f"jax {impl}"] = jax_call(net, typed, params, inputs, dtype)
            if not args.skip_torch:
                calls["torch"] = torch_call(net, params, inputs, dtype)
            first, times = interleaved(calls, args.iters)
            for name, ts in times.items():
                ratio = ""
                if name != "torch" and "torch" in times:
                    ratio = f"{np.median(np.array(times['torch']) / np.array(ts)):9.2f}"
                row = f"{net:5} {dtype:9} {name:15} {first[name]:12.3f} {np.median(ts):9.3f} {ratio}"
                print(row, flush=True)


if __name__ == "__main__":
    main()
