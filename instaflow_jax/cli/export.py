"""``instaflow-export``: write any checkpoint step of a training run as a diffusers folder.

instaflow-export --workdir RUN --step N [--ema] --out DIR [--push-to-hub REPO [--private]]
"""

from __future__ import annotations

import argparse

from instaflow_jax.cli.common import run_cli


class UploadError(ValueError):
    """The exported folder could not be uploaded to the Hugging Face Hub."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="instaflow-export", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="the training run folder (holds checkpoints/).")
    parser.add_argument("--step", type=int, required=True, help="the checkpoint step to export.")
    parser.add_argument(
        "--ema", action="store_true", help="export the EMA weights of the UNet (default: the raw weights)."
    )
    parser.add_argument("--out", required=True, help="output diffusers folder.")
    parser.add_argument(
        "--push-to-hub",
        metavar="REPO",
        default=None,
        help="also upload the folder to this Hugging Face model repo (created if missing; needs a "
        "network and a token from `hf auth login` or HF_TOKEN).",
    )
    parser.add_argument("--private", action="store_true", help="create the hub repo as private.")
    return parser


def push_to_hub(folder: str, repo: str, private: bool, message: str) -> str:
    """Upload ``folder`` to the model repo ``repo`` (created if missing); returns the repo's URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=folder, repo_id=repo, repo_type="model", commit_message=message)
    except Exception as err:  # no network, no token, no permission …
        text = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise UploadError(
            f"uploading {folder} to {repo} failed ({type(err).__name__}: {text}). The folder is written; "
            "log in with `hf auth login` (or set HF_TOKEN), check the network and the repo name, then "
            "run again."
        ) from err
    return str(url)


def run(args: argparse.Namespace) -> None:
    from instaflow_jax.train.export import export_checkpoint

    weights = "EMA" if args.ema else "raw"
    out = export_checkpoint(args.workdir, args.step, args.out, ema=args.ema)
    print(f"wrote {out} (step {args.step}, {weights} UNet weights)")
    if args.push_to_hub:
        message = f"instaflow-jax export of step {args.step} ({weights} UNet weights)"
        print(f"pushed to {push_to_hub(out, args.push_to_hub, args.private, message)}")


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
