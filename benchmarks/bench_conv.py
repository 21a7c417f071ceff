"""One 3×3 convolution, XLA vs PyTorch, at the SD 1.5 UNet's and VAE decoder's sizes.

    python benchmarks/bench_conv.py            # float32, batch 1, this machine

Why it exists: after attention (``bench_attention.py``), the UNet's and the VAE decoder's 3×3
convolutions are what separates the JAX networks from PyTorch eager on a CPU. Each row times
``lax.conv_general_dilated`` (NHWC, HWIO) against ``torch.nn.functional.conv2d`` on the same
values in NCHW (what diffusers runs) and channels-last, alternating round by round, and checks that
both give the same result.
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import numpy as np
from jax import lax

# (side, channels): the VAE decoder's last three levels at 512² and the UNet's 64² level.
SHAPES = ((512, 128), (256, 256), (128, 512), (64, 320))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _row(side: int, channels: int, rounds: int, conv) -> str:
    import torch

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, side, side, channels)).astype(np.float32)
    w = (rng.standard_normal((3, 3, channels, channels)) / np.sqrt(9 * channels)).astype(np.float32)
    jx, jw = jax.device_put(x), jax.device_put(w)
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    tw = torch.from_numpy(w.transpose(3, 2, 0, 1).copy())
    tx_last = tx.contiguous(memory_format=torch.channels_last)
    tw_last = tw.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = torch.nn.functional.conv2d(tx, tw, padding=1).numpy().transpose(0, 2, 3, 1)
        error = float(np.abs(np.asarray(conv(jx, jw)) - expected).max())
        calls = {
            "xla": lambda: jax.block_until_ready(conv(jx, jw)),
            "nchw": lambda: torch.nn.functional.conv2d(tx, tw, padding=1),
            "nhwc": lambda: torch.nn.functional.conv2d(tx_last, tw_last, padding=1),
        }
        times = {name: [] for name in calls}
        for _ in range(rounds):
            for name, call in calls.items():
                times[name].append(_timed(call))
    ratio = np.median(np.array(times["xla"]) / np.array(times["nchw"]))
    ms = {name: np.median(ts) * 1e3 for name, ts in times.items()}
    gflop = 2 * side * side * channels * channels * 9 / 1e9
    return (
        f"{f'{side}² × {channels}':16} {gflop:6.1f} {ms['xla']:8.0f} {ms['nchw']:10.0f} {ms['nhwc']:10.0f} "
        f"{ratio:11.2f}   (max |xla − torch| {error:.0e})"
    )


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(
        f"# 3×3 convolution C→C, stride 1, SAME, float32, batch 1; jax {jax.__version__} on "
        f"{jax.default_backend()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"{platform.processor() or platform.machine()}; median of {args.rounds} rounds"
    )
    header = ("side × channels", "GFLOP", "xla ms", "NCHW ms", "NHWC ms", "xla ÷ NCHW")
    print(f"{header[0]:16} {header[1]:>6} {header[2]:>8} {header[3]:>10} {header[4]:>10} {header[5]:>11}")
    conv = jax.jit(
        lambda x, w: lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    )
    for side, channels in SHAPES:
        print(_row(side, channels, args.rounds, conv), flush=True)


if __name__ == "__main__":
    main()
