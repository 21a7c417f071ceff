"""Arguments and error handling shared by the command-line tools.

The entry helpers (``run_cli``, ``plain_text``, log quieting) live in :mod:`instaflow_jax.entry`
and ``resolve_dtype`` in :mod:`instaflow_jax.precision`; the CLIs import them from here.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from instaflow_jax.conventions import VAE_DOWNSAMPLE
from instaflow_jax.entry import plain_text, quiet_third_party, run_cli  # noqa: F401 (the CLIs' import location)
from instaflow_jax.models.attention import IMPLEMENTATIONS
from instaflow_jax.precision import resolve_dtype
from instaflow_jax.weights.tiny import TINY_RANDOM, resolve_model

SIZE_HELP = "pixels, a multiple of 8 (default: the model's native size, unet sample_size × VAE factor: "
SIZE_HELP += "512 for SD 1.5, 64 for tiny-random, 16 for the toy's exports)."


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="diffusers pipeline folder (SD 1.5, InstaFlow-0.9B, 2-Rectified Flow, a toy export …), a "
        f"cached Hugging Face repo id, or '{TINY_RANDOM}': a random tiny pipeline made once in "
        "~/.cache/instaflow_jax/tiny_random (offline smoke test).",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        help="compute dtype: auto (bfloat16 on GPU/TPU, float32 on CPU), float32, bfloat16, float16.",
    )
    parser.add_argument("--height", type=int, default=None, help=SIZE_HELP)
    parser.add_argument("--width", type=int, default=None, help=SIZE_HELP)
    parser.add_argument(
        "--attention",
        default="auto",
        choices=IMPLEMENTATIONS,
        help="attention implementation (instaflow_jax.models.attention): auto (Pallas kernel on TPU, "
        "cuDNN on GPU in half precision, else blockwise for large score matrices and XLA for small).",
    )


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=1, help="Euler steps (1 = one-step InstaFlow).")
    parser.add_argument("--guidance", type=float, default=0.0, help="CFG scale; on only when > 1.")
    parser.add_argument("--negative-prompt", default="", help="unconditional prompt under CFG.")
    parser.add_argument(
        "--solver",
        default="euler",
        choices=["euler", "dpmpp2m"],
        help="euler (rectified flow) or dpmpp2m (SD teacher: DPM-Solver++ on an ε-prediction UNet).",
    )


def check_size(args: argparse.Namespace) -> None:
    """Fail fast, before loading: a given ``--height``/``--width`` must be a positive multiple of 8."""
    for name in ("height", "width"):
        size = getattr(args, name)
        if size is not None and (size <= 0 or size % VAE_DOWNSAMPLE):
            raise ValueError(
                f"--{name} {size} is impossible: image sides must be positive multiples of "
                f"{VAE_DOWNSAMPLE} (the VAE maps 8×8 pixels to one latent)."
            )


def check_settings(args: argparse.Namespace, **minimums: float) -> None:
    """Fail fast, before loading anything: ``--seed``/``--seeds`` in 0…2³²−1, ``--steps`` ≥ 1,
    a finite ``--guidance``, and each ``minimums`` flag (attribute name → least value)."""
    from instaflow_jax.sampling.noise import MAX_SEED

    seeds = [args.seed] if hasattr(args, "seed") else list(getattr(args, "seeds", []))
    for seed in seeds:
        if not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed {seed} is out of range: seeds are 0…{MAX_SEED}.")
    if getattr(args, "steps", 1) < 1:
        raise ValueError(f"--steps must be ≥ 1, got {args.steps}.")
    if not math.isfinite(getattr(args, "guidance", 0.0)):
        raise ValueError(f"--guidance must be a finite number, got {args.guidance}.")
    for name, least in minimums.items():
        value = getattr(args, name)
        if not value >= least:
            raise ValueError(f"--{name.replace('_', '-')} must be ≥ {least:g}, got {value}.")


def load_for_cli(args: argparse.Namespace) -> tuple[Any, int, int]:
    """Validate the size first (fast failure), then load the pipeline: (pipe, height, width), the
    size defaulting to the model's native size."""
    import instaflow_jax

    check_size(args)
    pipe = instaflow_jax.load_pipeline(
        resolve_model(args.model), dtype=resolve_dtype(args.dtype), attention_impl=args.attention
    )
    native_height, native_width = pipe.native_size
    return pipe, args.height or native_height, args.width or native_width


def sampling_kwargs(args: argparse.Namespace, height: int, width: int) -> dict[str, Any]:
    """``Pipeline.generate`` keyword arguments from the shared sampling flags."""
    return {
        "num_steps": args.steps,
        "guidance_scale": args.guidance,
        "negative_prompt": args.negative_prompt,
        "height": height,
        "width": width,
        "solver": args.solver,
    }
