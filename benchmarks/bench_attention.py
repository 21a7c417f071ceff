"""Attention implementations: speed of one attention against PyTorch, and the memory they buy.

Two commands (each prints ratios measured in the same run):

    python benchmarks/bench_attention.py speed      # [1, 4096, 8, 40] float32, every implementation
                                                    # that runs here vs torch scaled_dot_product_attention
    python benchmarks/bench_attention.py memory     # XLA's accounting, compile only: SD 1.5 UNet forward
                                                    # at 512² batch 8, and the reflow train step at batch
                                                    # 8 and 48, xla vs blockwise, with and without remat

``speed`` alternates the implementations and PyTorch round by round and reports the median of the
per-round ratios, so a machine shared with other work biases both sides alike. On a GPU add
``--shape 8,4096,8,40 --dtype bfloat16`` (PyTorch then runs float16 on CUDA); ``cudnn`` and
``pallas_tpu`` run where their hardware is. ``memory`` allocates nothing: inputs are
``jax.ShapeDtypeStruct`` and only ``jit(...).lower(...).compile().memory_analysis()`` runs, so it
measures the backend it runs on (run it on the GPU/TPU for that device's numbers).
"""

from __future__ import annotations

import argparse
import functools
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from instaflow_jax.models import attention
from instaflow_jax.parallel import remat_compiler_options
from instaflow_jax.precision import parse_dtype

GIB = 2**30


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def speed(args: argparse.Namespace) -> None:
    shape = tuple(int(x) for x in args.shape.split(","))
    dtype = parse_dtype(args.dtype)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(3))
    backend = jax.default_backend()
    impls = [i for i in args.implementations if i == "xla" or i == "blockwise" or _runs_here(i, backend)]
    calls, errors = {}, {}
    reference = np.asarray(jax.jit(attention.xla_attention)(q, k, v), np.float32)
    for name in impls:
        fn = jax.jit(functools.partial(attention.dot_product_attention, implementation=name))
        errors[name] = float(np.abs(np.asarray(fn(q, k, v), np.float32) - reference).max())  # compiles
        calls[name] = functools.partial(lambda f: jax.block_until_ready(f(q, k, v)), fn)
    torch_call = None if args.skip_torch else _torch_sdpa(q, k, v, args.dtype)
    if torch_call:
        torch_call()
    times = {name: [] for name in calls} | ({"torch": []} if torch_call else {})
    ratios = {name: [] for name in calls}
    for _ in range(args.rounds):
        t_torch = _timed(torch_call) if torch_call else None
        if t_torch is not None:
            times["torch"].append(t_torch)
        for name, call in calls.items():
            t = _timed(call)
            times[name].append(t)
            if t_torch is not None:
                ratios[name].append(t / t_torch)
    print(
        f"# attention {list(shape)} (B, T, N, H) {args.dtype}; jax {jax.__version__} on {backend} "
        f"({jax.devices()[0].device_kind}, {platform.processor() or platform.machine()})"
    )
    print(f"# median of {args.rounds} rounds; each round runs PyTorch then every implementation once")
    print(
        f"{'implementation':14} {'median ms':>10} {'min ms':>8} {'÷ torch (median of rounds)':>28}  max |err|"
    )
    for name, ts in times.items():
        ratio = f"{np.median(ratios[name]):28.2f}" if ratios.get(name) else f"{'':28}"
        err = f"  {errors[name]:.1e}" if name in errors else ""
        print(f"{name:14} {np.median(ts) * 1e3:10.1f} {min(ts) * 1e3:8.1f} {ratio}{err}", flush=True)


def _runs_here(name: str, backend: str) -> bool:
    call = attention.AttentionCall(1, 8, 8, 1, 64, 64, "bfloat16")
    return attention.select_implementation(name, call, backend).implementation == name


def _torch_sdpa(q, k, v, dtype_name: str):
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype_name]
    if device == "cuda" and dtype_name == "bfloat16":
        torch_dtype = torch.float16
    tq, tk, tv = (
        torch.from_numpy(np.array(x, np.float32)).permute(0, 2, 1, 3).contiguous().to(device, torch_dtype)
        for x in (q, k, v)
    )
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        with torch.inference_mode():
            torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
        sync()

    return run


# ------------------------------------------------------------------------------- networks


def networks(args: argparse.Namespace) -> None:
    """SD 1.5-size UNet forward and one-step generation (text encoder + UNet + VAE decode, one
    fused JAX program vs PyTorch eager), per attention implementation, alternating round by round."""
    import os
    import sys

    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_generate import CONFIGS, MODULES, torch_models

    from instaflow_jax.sampling.text_to_image import SamplerSpec, make_generate_fn
    from instaflow_jax.testing import random_params

    dtype = parse_dtype(args.dtype)
    base = {k: MODULES[k](CONFIGS[k], dtype=dtype) for k in MODULES}
    params = {k: random_params(base[k], k, seed=i) for i, k in enumerate(base)}
    device_params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
    side, batch = args.resolution // 8, args.batch
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 49407, (batch, 77)).astype(np.int32)
    z0 = rng.standard_normal((batch, side, side, 4)).astype(np.float32)
    context = rng.standard_normal((batch, 77, 768)).astype(np.float32)
    t = np.full((batch,), 1000.0, np.float32)
    calls = {}
    for impl in args.implementations:
        modules = {k: m.clone(attention_impl=impl) for k, m in base.items()}
        unet = jax.jit(lambda p, x, c, m=modules["unet"]: m.apply({"params": p}, x, t, c))
        full = jax.jit(make_generate_fn(modules, SamplerSpec(1, "euler", False, "image")))
        calls[("unet", impl)] = functools.partial(
            lambda f: jax.block_until_ready(f(device_params["unet"], z0, context)), unet
        )
        calls[("one-step generation", impl)] = functools.partial(
            lambda f: jax.block_until_ready(f(device_params, ids, None, z0, 0.0)), full
        )
    torch_dtype = args.torch_dtype or args.dtype
    models = torch_models(params, "cpu", torch_dtype)
    tdt = getattr(torch, torch_dtype)
    t_ids, t_z0 = (
        torch.from_numpy(ids.astype(np.int64)),
        torch.from_numpy(z0.transpose(0, 3, 1, 2).copy()).to(tdt),
    )
    t_context, t_t = torch.from_numpy(context).to(tdt), torch.from_numpy(t)

    def torch_unet():
        with torch.inference_mode():
            models["unet"](t_z0, t_t, t_context)

    def torch_generate():  # InstaFlow's one step: z1 = z0 + v(z0, 1000), then decode
        with torch.inference_mode():
            c = models["text_encoder"](t_ids)[0]
            z = t_z0 + models["unet"](t_z0, t_t, c).sample
            (models["vae"].decode(z / 0.18215).sample / 2 + 0.5).clamp(0, 1)

    calls[("unet", "torch")] = torch_unet
    calls[("one-step generation", "torch")] = torch_generate
    first = {name: _timed(call) for name, call in calls.items()}  # JAX: compile + first run
    times = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, call in calls.items():
            times[name].append(_timed(call))
    print(
        f"# SD 1.5 sizes, random weights; {args.resolution}², batch {batch}, JAX {args.dtype}, PyTorch "
        f"{torch_dtype} eager; jax {jax.__version__} on {jax.default_backend()}, torch {torch.__version__}"
    )
    print(
        f"# median of {args.rounds} rounds, each running every program once; "
        "jax ÷ torch = median of the per-round ratios"
    )
    print(f"{'program':20} {'framework':14} {'first call s':>12} {'median s':>9} {'jax ÷ torch':>11}")
    for (program, who), ts in times.items():
        ratio = ""
        if who != "torch":
            ratio = f"{np.median(np.array(ts) / np.array(times[(program, 'torch')])):11.2f}"
        label = who if who == "torch" else f"jax {who}"
        print(
            f"{program:20} {label:14} {first[(program, who)]:12.1f} {np.median(ts):9.2f} {ratio}", flush=True
        )


# ------------------------------------------------------------------------------- memory


def _param_shapes(module, kind: str):
    """Parameter shapes of an SD-size module without allocating them."""
    if kind == "unet":
        args = (jnp.zeros((1, 8, 8, 4)), jnp.ones((1,)), jnp.zeros((1, 77, 768)))
    else:
        args = (jnp.zeros((1, 77), jnp.int32),)
    return jax.eval_shape(module.init, jax.random.key(0), *args)["params"]


def _stats(compiled) -> tuple[float, float]:
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes / GIB, m.temp_size_in_bytes / GIB


def unet_forward_memory(impl: str, batch: int, side: int, dtype) -> tuple[float, float]:
    from instaflow_jax.models import UNet2DConditionModel, UNetConfig

    unet = UNet2DConditionModel(UNetConfig(), dtype=dtype, attention_impl=impl)
    params = _param_shapes(unet, "unet")
    args = (
        jax.ShapeDtypeStruct((batch, side, side, 4), jnp.float32),
        jax.ShapeDtypeStruct((batch,), jnp.float32),
        jax.ShapeDtypeStruct((batch, 77, 768), jnp.float32),
    )
    fn = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c))
    return _stats(fn.lower(params, *args).compile())


def train_step_memory(impl: str, batch: int, side: int, dtype, remat: bool) -> tuple[float, float]:
    """The trainer's own reflow step: frozen CLIP, UNet forward + backward in ``dtype``, float32
    master weights, AdamW with clipping, EMA (``instaflow_jax.train.state.train_step``)."""
    from instaflow_jax.models import CLIPTextConfig, CLIPTextModel, UNet2DConditionModel, UNetConfig
    from instaflow_jax.train.config import OptimizerConfig
    from instaflow_jax.train.objectives import make_reflow_loss
    from instaflow_jax.train.state import create_state, make_optimizer, train_step

    modules = {
        "unet": UNet2DConditionModel(UNetConfig(), dtype=dtype, remat=remat, attention_impl=impl),
        "text_encoder": CLIPTextModel(CLIPTextConfig(), dtype=dtype, attention_impl=impl),
    }
    optimizer, schedule = make_optimizer(OptimizerConfig(learning_rate=1e-6, warmup_steps=0), 1000)
    unet_params = _param_shapes(modules["unet"], "unet")
    state = jax.eval_shape(functools.partial(create_state, optimizer=optimizer), unet_params)
    frozen = {
        "text_encoder": _param_shapes(modules["text_encoder"], "text_encoder"),
        "uncond_ids": jax.ShapeDtypeStruct((1, 77), jnp.int32),
    }
    batch_spec = {
        "x0": jax.ShapeDtypeStruct((batch, side, side, 4), jnp.float32),
        "x1": jax.ShapeDtypeStruct((batch, side, side, 4), jnp.float32),
        "ids": jax.ShapeDtypeStruct((batch, 77), jnp.int32),
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
        compiler_options=remat_compiler_options(remat),  # else XLA:CPU CSEs the recomputation away
    )
    return _stats(step.lower(state, frozen, batch_spec).compile())


def memory(args: argparse.Namespace) -> None:
    dtype = parse_dtype(args.dtype)
    side = args.resolution // 8
    print(
        f"# XLA memory_analysis() of compiled programs (nothing allocated); jax {jax.__version__} on "
        f"{jax.default_backend()} ({jax.devices()[0].device_kind}); SD 1.5 UNet, {args.resolution}², "
        f"{args.dtype} compute, float32 parameters"
    )
    print(f"{'program':34} {'attention':10} {'arguments GiB':>13} {'temp GiB':>9} {'sum GiB':>8}  compile s")
    rows = []
    if "forward" in args.programs:
        rows += [(f"UNet forward, batch {args.forward_batch}", impl, None) for impl in args.implementations]
    if "train" in args.programs:
        for batch in args.train_batches:
            for remat in (False, True):
                for impl in args.implementations:
                    name = f"reflow train step, batch {batch}" + (", remat" if remat else "")
                    rows.append((name, impl, (batch, remat)))
    for name, impl, train in rows:
        start = time.perf_counter()
        if train is None:
            arg_gib, temp_gib = unet_forward_memory(impl, args.forward_batch, side, dtype)
        else:
            arg_gib, temp_gib = train_step_memory(impl, train[0], side, dtype, train[1])
        seconds = time.perf_counter() - start
        total = arg_gib + temp_gib
        print(f"{name:34} {impl:10} {arg_gib:13.2f} {temp_gib:9.2f} {total:8.2f}  {seconds:9.0f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("speed", help="one attention, every implementation vs PyTorch SDPA")
    p.add_argument("--shape", default="1,4096,8,40", help="B,T,N,H (self-attention)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--implementations", nargs="+", default=["xla", "blockwise", "cudnn", "pallas_tpu"])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--skip-torch", action="store_true")
    p = sub.add_parser("networks", help="UNet forward and one-step generation vs PyTorch eager")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--torch-dtype", default=None, help="default: --dtype")
    p.add_argument("--implementations", nargs="+", default=["xla", "auto"])
    p.add_argument("--rounds", type=int, default=3)
    p = sub.add_parser("memory", help="XLA's memory accounting of the UNet forward and the train step")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16", help="compute dtype (parameters stay float32)")
    p.add_argument("--implementations", nargs="+", default=["xla", "blockwise"])
    p.add_argument("--programs", nargs="+", default=["forward", "train"], choices=["forward", "train"])
    p.add_argument("--forward-batch", type=int, default=8)
    p.add_argument("--train-batches", type=int, nargs="+", default=[8, 48])
    args = parser.parse_args()
    {"speed": speed, "networks": networks, "memory": memory}[args.command](args)


if __name__ == "__main__":
    main()
