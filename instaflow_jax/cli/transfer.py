"""``instaflow-transfer``: move an SD 1.5 fine-tune onto InstaFlow: target + scale·(finetuned − base).

instaflow-transfer --base SD15 --finetuned DIR --target INSTAFLOW --out DIR [--scale 1.0]
"""

from __future__ import annotations

import argparse

from instaflow_jax.cli.common import plain_text, run_cli
from instaflow_jax.transfer import transfer

_DESCRIPTIONS = {
    "transferred": "target + scale·(finetuned − base)",
    "target": "the target's (the fine-tune left it unchanged)",
    "finetuned": "the fine-tune's",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="instaflow-transfer", description=plain_text(__doc__))
    parser.add_argument(
        "--base", required=True, help="the SD 1.5 diffusers folder the fine-tune started from."
    )
    parser.add_argument("--finetuned", required=True, help="the fine-tuned SD 1.5 diffusers folder.")
    parser.add_argument(
        "--target",
        required=True,
        help="the rectified-flow folder to move the delta onto (InstaFlow-0.9B, 2-RF).",
    )
    parser.add_argument("--out", required=True, help="output diffusers folder.")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the delta (default 1.0).")
    return parser


def run(args: argparse.Namespace) -> None:
    print(f"writing {args.out}: {args.target} + {args.scale:g}·({args.finetuned} − {args.base})", flush=True)
    report = transfer(args.base, args.finetuned, args.target, args.out, args.scale)
    for name, action in report.actions.items():
        print(f"{name}: {_DESCRIPTIONS[action]} (max |finetuned − base| = {report.max_abs_delta[name]:.3g})")
    print(f"wrote {report.out}")


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
