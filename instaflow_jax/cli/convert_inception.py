"""``instaflow-convert-inception``: convert the FID Inception weights (pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth``) once to safetensors, so hosts without torch can load them.

instaflow-convert-inception SRC.pth DST.safetensors
"""

from __future__ import annotations

import argparse

from instaflow_jax.entry import plain_text, run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="instaflow-convert-inception", description=plain_text(__doc__))
    parser.add_argument(
        "src", help="the FID Inception state dict (.pth; read with torch, weights_only=True)."
    )
    parser.add_argument("dst", help="the safetensors file to write (same keys, float32).")
    return parser


def run(args: argparse.Namespace) -> None:
    from instaflow_jax.weights.inception import convert_fid_inception

    count = convert_fid_inception(args.src, args.dst)
    print(f"wrote {args.dst} ({count} tensors from {args.src})")


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
