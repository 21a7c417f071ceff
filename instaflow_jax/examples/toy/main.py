"""The whole InstaFlow method, small: ``instaflow-toy --workdir runs/toy`` (≈ 14 min on 2 idle CPU cores).

Stages, each with the package's own code (the SD path's UNet, text encoder, samplers, trainer
and triplet generator), each resumable, all outputs in ``workdir``:

  1. pipeline          a pixel-space SD-style pipeline with a frozen random CLIP text encoder
  2. teacher           ε-prediction diffusion training on the procedural shapes (the "SD 1.5")
  3. teacher_triplets  (prompt, X0, X1) with the teacher's DPM-Solver++ and CFG
  4. reflow            text-conditioned reflow → 2-Rectified Flow
  5. rf_triplets       (prompt, X0, X1) with the 2-RF's Euler solver and CFG
  6. distill           one-step distillation of the 2-RF with L2 → "InstaFlow"
  7. distill_lpips     the LPIPS stage after it, when LPIPS weights are available locally
  8. direct            the baseline: the same one-step distillation straight from the teacher
  9. eval              FID and prompt accuracy on a classifier's features, straightness, figures

Running the same command again skips finished stages and resumes an interrupted one. Also
``python -m instaflow_jax.examples.toy``; the stages are ``stages.py``.
"""

from __future__ import annotations

import os
import sys

from instaflow_jax.examples.toy.stages import run_toy


def use_every_core() -> None:
    """On CPU, one virtual device per core: the batch is split over them (data parallel), which
    keeps both cores of a small machine busy on the toy's small ops (≈ 20 % faster on 2 cores).
    Only the host platform is affected, and only when XLA_FLAGS does not already say."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        # A power of two (≤ 8) so that every stage's batch size divides over the devices.
        count = 1 << (min(cores, 8).bit_length() - 1)
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


def expand_variant(argv: list[str], config_file: str) -> list[str]:
    """``--variant X`` / ``--variant=X`` → ``--config=<config_file>:X``."""
    out, take = [], False
    for arg in argv:
        if take:
            out.append(f"--config={config_file}:{arg}")
            take = False
        elif arg == "--variant":
            take = True
        elif arg.startswith("--variant="):
            out.append(f"--config={config_file}:{arg.split('=', 1)[1]}")
        else:
            out.append(arg)
    if take:  # "--variant" last, without a value: absl says so
        out.append("--variant")
    return out


def run() -> None:
    """``instaflow-toy [--variant tiny|quality] --workdir DIR [--config.key=value …]``."""
    from absl import flags
    from ml_collections import config_flags

    from instaflow_jax.entry import exit_on_user_errors, run_absl

    use_every_core()
    default = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.py")
    sys.argv = expand_variant(sys.argv, default)
    config = config_flags.DEFINE_config_file(
        "config", default, "toy config (see --variant)", lock_config=True
    )
    workdir = flags.DEFINE_string("workdir", "runs/toy", "run folder for every stage's outputs")
    flags.DEFINE_string("variant", None, "tiny (minutes) or quality (longer); default ≈ 14 min on 2 cores")

    def main(argv: list[str]) -> None:
        print(f"run folder: {os.path.abspath(workdir.value)} (summary.md, eval/, one folder per stage)")
        with exit_on_user_errors():
            run_toy(config.value, workdir.value)
        with open(os.path.join(workdir.value, "summary.md")) as f:
            print(f.read())

    run_absl(main)
