"""``instaflow-demo``: a local web page for one-step generation (Gradio), beside the few-step 2-RF.

instaflow-demo --model instaflow-0.9B --model2 2-rf [--host 127.0.0.1 --port 7860] [--share]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

from instaflow_jax.cli.common import TINY_RANDOM, plain_text, resolve_dtype, run_cli
from instaflow_jax.demo.engine import DEFAULT_MODEL2_GUIDANCE, DEFAULT_MODEL2_STEPS, parse_size
from instaflow_jax.precision import parse_dtype


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="instaflow-demo",
        description=plain_text(__doc__),
        epilog="Every size, image count and step count the page offers is compiled before the server "
        "starts, so no click waits for a compile; the persistent XLA cache makes later starts fast.",
    )
    parser.add_argument(
        "--model",
        required=True,
        help="the main model, e.g. InstaFlow-0.9B: a diffusers folder, a cached Hugging Face repo id, "
        f"or '{TINY_RANDOM}' (a random tiny pipeline, offline smoke test).",
    )
    parser.add_argument(
        "--model2",
        default=None,
        help="optional second model, e.g. the 2-Rectified Flow: adds the side-by-side tab "
        "(--model at one step vs this model at N steps, same prompt and seed).",
    )
    parser.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=[1],
        metavar="N",
        help="Euler step counts offered for --model, first = default (default: 1, a one-step model: "
        "the steps control is hidden).",
    )
    parser.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="default CFG scale for --model; leave out for a model without guidance (InstaFlow: the "
        "guidance and negative-prompt controls are hidden).",
    )
    parser.add_argument(
        "--model2-steps",
        type=int,
        nargs="+",
        default=list(DEFAULT_MODEL2_STEPS),
        metavar="N",
        help=f"Euler step counts offered for --model2 (default: {' '.join(map(str, DEFAULT_MODEL2_STEPS))}).",
    )
    parser.add_argument(
        "--model2-guidance",
        type=float,
        default=DEFAULT_MODEL2_GUIDANCE,
        help=f"default CFG scale for --model2 (default: {DEFAULT_MODEL2_GUIDANCE}; 1 = off).",
    )
    parser.add_argument(
        "--sizes",
        nargs="+",
        default=None,
        metavar="HxW",
        help="image sizes offered, e.g. 512x512 384x640 (default: the model's native size, unet "
        "sample_size × 8: 512x512 for SD 1.5, 64x64 for tiny-random).",
    )
    parser.add_argument(
        "--max-images",
        type=int,
        default=4,
        help="largest number of images per request; 1 to this many are compiled (default: 4).",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        help="compute dtype: auto (bfloat16 on GPU/TPU, float32 on CPU), float32, bfloat16, float16.",
    )
    parser.add_argument(
        "--live-delay",
        type=float,
        default=0.4,
        metavar="SECONDS",
        help="live mode regenerates once the prompt has not changed for this long (default: 0.4).",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to serve on (default: 127.0.0.1, this machine only; 0.0.0.0 for the network).",
    )
    parser.add_argument("--port", type=int, default=7860, help="port to serve on (default: 7860).")
    parser.add_argument(
        "--share",
        action="store_true",
        help="also open a temporary public *.gradio.live link through Gradio's tunnel (e.g. from "
        "Colab); off unless given.",
    )
    return parser


def check_arguments(args: argparse.Namespace) -> list[tuple[int, int]] | None:
    """Fail fast, before loading anything: the sizes as (height, width), or None for the default."""
    if importlib.util.find_spec("gradio") is None:
        raise ValueError('the web demo needs Gradio, which is not installed: pip install -e ".[demo]"')
    for flag, steps in (("--steps", args.steps), ("--model2-steps", args.model2_steps)):
        if min(steps) < 1:
            raise ValueError(f"{flag} must be positive step counts, got {steps}.")
    parse_dtype(resolve_dtype(args.dtype))  # an unknown name fails here, not in the page
    if args.max_images < 1:
        raise ValueError(f"--max-images must be ≥ 1, got {args.max_images}.")
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be 1 to 65535, got {args.port}.")
    if args.live_delay < 0:
        raise ValueError(f"--live-delay must be ≥ 0 seconds, got {args.live_delay}.")
    try:
        return [parse_size(size) for size in args.sizes] if args.sizes else None
    except ValueError as err:
        raise ValueError(f"--sizes: {err}") from None


def serve(args: argparse.Namespace) -> None:
    sizes = check_arguments(args)
    from instaflow_jax.demo import build_demo, load_engine

    engine = load_engine(
        args.model,
        args.model2,
        steps=args.steps,
        guidance=args.guidance,
        model2_steps=args.model2_steps,
        model2_guidance=args.model2_guidance,
        sizes=sizes,
        max_images=args.max_images,
        dtype=args.dtype,
    )
    for message in engine.errors:
        print(f"error: {message} (the page shows this too)", file=sys.stderr)
    if engine.models:
        engine.warm_up(log=lambda line: print(line, flush=True))
    demo = build_demo(engine, live_delay_s=args.live_delay)
    demo.launch(**launch_options(args, engine.out_dir))


def launch_options(args: argparse.Namespace, out_dir: str) -> dict:
    """``Blocks.launch`` keywords: bind ``--host`` (127.0.0.1 unless told otherwise), open a public
    share link only with ``--share`` (Gradio would otherwise turn it on by itself in Colab), no
    server-side rendering (no Node.js), and serve the interpolation GIFs from ``out_dir``."""
    return {
        "server_name": args.host,
        "server_port": args.port,
        "share": bool(args.share),
        "ssr_mode": False,
        "allowed_paths": [out_dir],
        "footer_links": ["api", "settings"],
    }


def main(argv: list[str] | None = None) -> int:
    return run_cli(serve, build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
