"""``instaflow-generate``: prompts → PNG grid (or one PNG per image), with timings.

instaflow-generate --model DIR --prompt "a photo of a cat" --num-images 4 --out grid.png
"""

from __future__ import annotations

import argparse
import os

from instaflow_jax.cli.common import (
    add_model_arguments,
    add_sampling_arguments,
    check_settings,
    load_for_cli,
    plain_text,
    run_cli,
    sampling_kwargs,
)
from instaflow_jax.cli.extensions import (
    add_extension_arguments,
    apply_loras,
    check_control_arguments,
    control_image_size,
    controlnet_kwargs,
)
from instaflow_jax.files import ensure_writable_folder
from instaflow_jax.image_io import make_grid, save_png


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="instaflow-generate", description=plain_text(__doc__))
    add_model_arguments(parser)
    parser.add_argument("--prompt", required=True, action="append", help="repeat for several prompts.")
    add_sampling_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="noise seed (sample i: fold_in(seed, i)).")
    parser.add_argument("--num-images", type=int, default=4, help="images per prompt.")
    parser.add_argument("--out", default="grid.png", help="grid PNG path (default: grid.png).")
    parser.add_argument("--out-dir", default=None, help="also write each image here as a PNG.")
    add_extension_arguments(parser)
    return parser


def generate(args: argparse.Namespace) -> None:
    check_settings(args, num_images=1)
    ensure_writable_folder(os.path.dirname(os.path.abspath(args.out)), "the folder of --out")
    if args.out_dir:
        ensure_writable_folder(args.out_dir, "--out-dir")
    check_control_arguments(args)
    if args.height is None and args.width is None and args.control_image:
        args.height, args.width = control_image_size(args)  # the output takes the condition's size
    pipe, height, width = load_for_cli(args)
    pipe = apply_loras(pipe, args)
    prompts = [p for p in args.prompt for _ in range(args.num_images)]
    where = args.out + (f" and {args.out_dir}/" if args.out_dir else "")
    print(f"generating {len(prompts)} image(s) at {height}×{width} into {where}", flush=True)
    kwargs = {**sampling_kwargs(args, height, width), "seed": args.seed}
    kwargs.update(controlnet_kwargs(args, height, width))
    images = pipe.generate(prompts, **kwargs)  # compiles first (lower().compile()), then runs once
    timings = pipe.last_timings
    save_png(args.out, make_grid(images, columns=args.num_images))
    if args.out_dir:
        for i, image in enumerate(images):
            save_png(os.path.join(args.out_dir, f"{i:04d}.png"), image)
    size = f"{height}×{width}"
    print(f"wrote {args.out} ({len(images)} images, {size}, {args.steps} step(s), g={args.guidance})")
    print(f"compile time: {timings.compile_s:.2f} s")
    per_image = timings.per_image_s * 1000
    print(f"generation: {timings.run_s:.3f} s for {timings.batch} images = {per_image:.1f} ms/image")


def main(argv: list[str] | None = None) -> int:
    return run_cli(generate, build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
