"""Arguments and error handling shared by the command-line tools."""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import jax

from instaflow_jax.conventions import VAE_DOWNSAMPLE
from instaflow_jax.models import ConfigError
from instaflow_jax.models.attention import IMPLEMENTATIONS
from instaflow_jax.weights import SafetensorsError, WeightsMismatchError

TINY_RANDOM = "tiny-random"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="diffusers pipeline folder (SD 1.5, InstaFlow-0.9B, 2-Rectified Flow …), a cached Hugging "
        f"Face repo id, or '{TINY_RANDOM}' for a random tiny pipeline (offline smoke test).",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        help="compute dtype: auto (bfloat16 on GPU/TPU, float32 on CPU), float32, bfloat16, float16.",
    )
    parser.add_argument("--height", type=int, default=None, help="pixels, multiple of 8 (default 512).")
    parser.add_argument("--width", type=int, default=None, help="pixels, multiple of 8 (default 512).")
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


def resolve_dtype(name: str) -> str:
    if name != "auto":
        return name
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def resolve_size(args: argparse.Namespace, model_path: str) -> tuple[int, int]:
    """Requested size, defaulting to 512 (64 for the tiny random model); fails fast on bad values."""
    default = 64 if model_path == TINY_RANDOM else 512
    height, width = args.height or default, args.width or default
    for name, size in (("height", height), ("width", width)):
        if size <= 0 or size % VAE_DOWNSAMPLE:
            raise ValueError(
                f"--{name} {size} is impossible: image sides must be positive multiples of "
                f"{VAE_DOWNSAMPLE} (the VAE maps 8×8 pixels to one latent)."
            )
    return height, width


def resolve_model(path: str) -> str:
    """``tiny-random`` → a freshly written random tiny pipeline; anything else unchanged."""
    if path != TINY_RANDOM:
        return path
    from instaflow_jax.testing import make_tiny_pipeline

    folder = os.path.join(tempfile.gettempdir(), "instaflow_jax_tiny_random")
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        make_tiny_pipeline(folder, seed=0)
    return folder


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


USER_ERRORS = (FileNotFoundError, ConfigError, WeightsMismatchError, SafetensorsError, ValueError)


def run_cli(main: Callable[[argparse.Namespace], Any], parser: argparse.ArgumentParser, argv=None) -> int:
    """Parse, run, and turn user errors into one ``error:`` line and exit status 2."""
    args = parser.parse_args(argv)
    try:
        main(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def load_for_cli(args: argparse.Namespace) -> tuple[Any, int, int]:
    """Validate the size first (fast failure), then load the pipeline: (pipe, height, width)."""
    import instaflow_jax

    height, width = resolve_size(args, args.model)
    pipe = instaflow_jax.load_pipeline(
        resolve_model(args.model), dtype=resolve_dtype(args.dtype), attention_impl=args.attention
    )
    return pipe, height, width


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


def run_absl(main: Callable[[list[str]], None]) -> None:
    """``absl.app.run`` whose flag errors (an unknown ``--config.key``) become one ``error:`` line.

    Only flag parsing is guarded: errors raised by ``main`` itself keep their traceback."""
    from absl import app

    def parse_flags(argv: list[str]) -> list[str]:
        try:
            return app.parse_flags_with_usage(argv)
        except (AttributeError, KeyError) as err:  # ml_collections' override errors
            message = str(err).strip("'\"").replace("\\n", " ").replace('\\"', '"').replace("\\'", "'")
            print(f"error: unknown or invalid config override: {message}", file=sys.stderr)
            sys.exit(2)

    app.run(main, flags_parser=parse_flags)
