"""``instaflow-eval``: FID and CLIP score like the paper (MS COCO), on every device, resumable.

instaflow-eval --model DIR --protocol coco2017-5k --coco COCO --inception pt_inception-2015-12-05-6726825d.pth
    --clip CLIP-ViT-g-14 --steps 1 --guidance 0 --out eval/instaflow-0.9B

Rerunning the same command after an interruption resumes from the batches already written.
"""

from __future__ import annotations

import argparse

from instaflow_jax.cli.common import (
    add_model_arguments,
    add_sampling_arguments,
    check_settings,
    check_size,
    plain_text,
    run_cli,
)
from instaflow_jax.evaluation.coco import PROTOCOLS
from instaflow_jax.evaluation.job import DEFAULT_STATS_CACHE, EvalSettings, evaluate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="instaflow-eval", description=plain_text(__doc__))
    add_model_arguments(parser)  # --model, --dtype, --height, --width, --attention
    parser.add_argument("--protocol", default="coco2017-5k", choices=sorted(PROTOCOLS))
    parser.add_argument(
        "--coco",
        default=None,
        help="local COCO folder (annotations/ + val2017/ or val2014/), or tfds:DATA_DIR with a "
        "prepared coco_captions/2014 (coco2014-30k only).",
    )
    parser.add_argument(
        "--prompts",
        default=None,
        help="a prompt file instead of COCO: .txt (one per line), or .jsonl/.csv/.parquet "
        "with a 'prompt' column.",
    )
    parser.add_argument(
        "--num-images",
        type=int,
        default=None,
        help="fewer prompts than the protocol's.",
    )
    add_sampling_arguments(parser)
    parser.add_argument("--batch", type=int, default=64, help="images per batch per process (default 64).")
    parser.add_argument("--seed", type=int, default=0, help="noise seed: sample i uses fold_in(seed, i).")
    parser.add_argument("--caption-seed", type=int, default=0, help="seed of the protocol's caption draw.")
    parser.add_argument(
        "--inception",
        default=None,
        help="FID Inception weights: pt_inception-2015-12-05-6726825d.pth "
        "or its .safetensors (instaflow-convert-inception).",
    )
    parser.add_argument("--clip", default=None, help="a transformers CLIPModel folder for the CLIP score.")
    parser.add_argument(
        "--ref-stats",
        default=None,
        help="reference statistics .npz (mu, sigma).",
    )
    parser.add_argument(
        "--stats-cache",
        default=DEFAULT_STATS_CACHE,
        help="reference statistics cache.",
    )
    parser.add_argument(
        "--save-images",
        action="store_true",
        help="write every image to OUT/images/.",
    )
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="multi-host: jax.distributed.initialize (TPU pods, SLURM); same command on every host.",
    )
    parser.add_argument(
        "--coordinator-address",
        default="",
        help="multi-host by hand: HOST:PORT of process 0 (with --num-processes and --process-id).",
    )
    parser.add_argument("--num-processes", type=int, default=0, help="multi-host by hand: process count.")
    parser.add_argument("--process-id", type=int, default=-1, help="multi-host by hand: this process, 0…N−1.")
    parser.add_argument("--out", required=True, help="results folder (resumes if it holds this evaluation).")
    return parser


def run(args: argparse.Namespace) -> None:
    check_settings(args)  # seed, steps and guidance, before anything loads
    check_size(args)
    fields = {name: getattr(args, name) for name in EvalSettings.__dataclass_fields__}
    evaluate(EvalSettings(**fields))


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
