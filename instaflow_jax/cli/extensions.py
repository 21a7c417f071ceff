"""Command-line options for LoRA files and ControlNets, shared by the generation tools.

``--lora PATH[:SCALE]`` (repeatable) merges LoRA files; ``--controlnet DIR --control-image PNG
[--controlnet-scale S]`` (each repeatable, in matching order) conditions on images, optionally
turned into Canny edge maps with ``--canny``.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import numpy as np
from PIL import Image

from instaflow_jax.conventions import VAE_DOWNSAMPLE


def add_extension_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="LoRA .safetensors (kohya/A1111, diffusers, PEFT) merged with SCALE (default 1.0); repeatable.",
    )
    parser.add_argument(
        "--lora-skip-unmatched",
        action="store_true",
        help="skip (and list) LoRA keys that match no layer instead of failing.",
    )
    parser.add_argument(
        "--controlnet",
        action="append",
        default=[],
        metavar="DIR",
        help="diffusers ControlNet folder; repeatable.",
    )
    parser.add_argument(
        "--control-image",
        action="append",
        default=[],
        metavar="PNG",
        help="condition image, one per --controlnet (resized to the output size).",
    )
    parser.add_argument(
        "--controlnet-scale",
        action="append",
        type=float,
        default=[],
        metavar="S",
        help="ControlNet residual scale, one or one per --controlnet (default 1.0).",
    )
    parser.add_argument(
        "--canny",
        action="store_true",
        help="turn the control images into Canny edge maps (thresholds 100/200) first.",
    )


def parse_lora(spec: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` → (path, scale); a suffix that is not a number belongs to the path."""
    path, sep, tail = spec.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def apply_loras(pipe: Any, args: argparse.Namespace) -> Any:
    """The pipeline with every ``--lora`` merged in order."""
    for spec in args.lora:
        path, scale = parse_lora(spec)
        pipe = pipe.with_lora(path, scale=scale, strict=not args.lora_skip_unmatched)
        if pipe.lora_skipped:
            print(f"{path}: skipped {len(pipe.lora_skipped)} unmatched LoRA keys")
    return pipe


def check_control_arguments(args: argparse.Namespace) -> None:
    """Counts of --controlnet / --control-image / --controlnet-scale agree (before any loading)."""
    nets, images, scales = len(args.controlnet), len(args.control_image), len(args.controlnet_scale)
    if nets != images:
        raise ValueError(
            f"{nets} --controlnet and {images} --control-image given; give one image per ControlNet."
        )
    if scales not in (0, 1, nets):
        raise ValueError(
            f"{scales} --controlnet-scale values for {nets} ControlNet(s); give one or one each."
        )
    if not nets and (scales or args.canny):
        raise ValueError("--controlnet-scale and --canny need --controlnet and --control-image.")
    for path in args.control_image:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--control-image {path}: no such file.")


def control_image_size(args: argparse.Namespace) -> tuple[int, int] | None:
    """(height, width) of the first control image, to be the output size when none is given."""
    if not args.control_image:
        return None
    with Image.open(args.control_image[0]) as image:
        width, height = image.size
    if height % VAE_DOWNSAMPLE or width % VAE_DOWNSAMPLE:
        raise ValueError(
            f"--control-image {args.control_image[0]} is {width}×{height}, not a multiple of "
            f"{VAE_DOWNSAMPLE}; pass --height and --width to resize it."
        )
    return height, width


def controlnet_kwargs(args: argparse.Namespace, height: int, width: int) -> dict[str, Any]:
    """``Pipeline.generate`` keyword arguments for the ControlNet options (empty without them)."""
    if not args.controlnet:
        return {}
    import instaflow_jax
    from instaflow_jax.image_ops import canny
    from instaflow_jax.precision import resolve_dtype

    nets = [instaflow_jax.load_controlnet(path, dtype=resolve_dtype(args.dtype)) for path in args.controlnet]
    images = []
    for path in args.control_image:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if image.size != (width, height):
                image = image.resize((width, height), Image.LANCZOS)
            array = np.asarray(image)
        images.append(canny(array) if args.canny else array)
    return {
        "controlnet": nets if len(nets) > 1 else nets[0],
        "control_image": images if len(images) > 1 else images[0],
        "controlnet_scale": args.controlnet_scale or 1.0,
    }
