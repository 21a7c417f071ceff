"""``instaflow-interpolate``: a smooth walk between two noises for one prompt → PNG frames + GIF.

instaflow-interpolate --model DIR --prompt "a photo of a cat" --seeds 0 1 --frames 16 --out-dir walk
"""

from __future__ import annotations

import argparse
import os

import jax

from instaflow_jax.cli.common import (
    add_model_arguments,
    add_sampling_arguments,
    check_settings,
    load_for_cli,
    plain_text,
    run_cli,
    sampling_kwargs,
)
from instaflow_jax.conventions import latent_shape
from instaflow_jax.files import ensure_writable_folder
from instaflow_jax.image_io import save_gif, save_png
from instaflow_jax.progress import progress_bar
from instaflow_jax.sampling.interpolation import interpolation_latents


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="instaflow-interpolate", description=plain_text(__doc__))
    add_model_arguments(parser)
    parser.add_argument("--prompt", required=True, help="the one prompt of every frame.")
    add_sampling_arguments(parser)
    parser.add_argument(
        "--seeds",
        type=int,
        nargs=2,
        default=[0, 1],
        metavar=("A", "B"),
        help="the two end noises (default: 0 1).",
    )
    parser.add_argument("--frames", type=int, default=16, help="frames, ends included (default: 16).")
    parser.add_argument("--batch", type=int, default=8, help="frames generated per call (default: 8).")
    parser.add_argument("--fps", type=float, default=8.0, help="GIF frames per second (default: 8).")
    parser.add_argument("--out-dir", default="interpolation", help="PNG frames and the GIF go here.")
    return parser


def interpolate(args: argparse.Namespace) -> None:
    check_settings(args, frames=2, batch=1, fps=0.1)
    ensure_writable_folder(args.out_dir, "--out-dir")
    pipe, height, width = load_for_cli(args)
    print(f"writing {args.frames} frames at {height}×{width} and a GIF into {args.out_dir}/", flush=True)
    shape = latent_shape(1, height, width, pipe.latent_channels, pipe.vae_scale_factor)[1:]
    latents = interpolation_latents(args.seeds[0], args.seeds[1], shape, args.frames)
    frames, compile_s, run_s = [], 0.0, 0.0
    kwargs = sampling_kwargs(args, height, width)
    progress = progress_bar(total=args.frames, desc="frames", unit="frame")
    for start in range(0, args.frames, args.batch):
        chunk = latents[start : start + args.batch]
        frames.extend(pipe.generate([args.prompt] * len(chunk), latents=chunk, **kwargs))
        compile_s, run_s = compile_s + pipe.last_timings.compile_s, run_s + pipe.last_timings.run_s
        progress.update(len(chunk))
    progress.close()
    for i, frame in enumerate(frames):
        save_png(os.path.join(args.out_dir, f"frame_{i:03d}.png"), frame)
    gif = save_gif(os.path.join(args.out_dir, "interpolation.gif"), frames, int(1000 / args.fps))
    print(f"wrote {len(frames)} frames and {gif} on {jax.default_backend()}")
    print(f"compile time: {compile_s:.2f} s")
    per_image = run_s / len(frames) * 1000
    print(f"generation: {run_s:.3f} s for {len(frames)} images = {per_image:.1f} ms/image")


def main(argv: list[str] | None = None) -> int:
    return run_cli(interpolate, build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
