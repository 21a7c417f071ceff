"""``python -m instaflow_jax.train --config configs/reflow_sd15.py:tiny --workdir runs/reflow``.

Any config key can be overridden (``--config.batch_size=1024``); unknown keys are refused.
Running the same command again resumes from the last checkpoint in ``workdir``.
"""

from __future__ import annotations

import sys


def run() -> None:
    from absl import app, flags
    from ml_collections import config_flags

    from instaflow_jax.entry import exit_on_user_errors, run_absl

    config = config_flags.DEFINE_config_file(
        "config", None, "training config, e.g. configs/reflow_sd15.py:tiny", lock_config=True
    )
    workdir = flags.DEFINE_string("workdir", None, "run folder: checkpoints, metrics, samples, export")
    flags.mark_flags_as_required(["config", "workdir"])

    def main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}")
        print(f"run folder: {workdir.value} (checkpoints/, metrics.jsonl, samples/, export/)", flush=True)
        from instaflow_jax.parallel import ProcessBarrierTimeout
        from instaflow_jax.train.trainer import train_and_evaluate

        with exit_on_user_errors():
            try:
                result = train_and_evaluate(config.value, workdir.value)
            except ProcessBarrierTimeout as err:  # a TimeoutError, not a user error: status 1
                print(f"error: {err}", file=sys.stderr)
                sys.exit(1)
        if result.preempted:
            print(
                f"preempted: saved the checkpoint of step {result.step} in {result.workdir}/checkpoints; "
                "run the same command to resume."
            )
            return
        last = max(result.losses) if result.losses else None
        print(
            f"done: {result.workdir}" + (f", loss {result.losses[last]:.4g} at step {last}" if last else "")
        )
        print(f"exported pipeline: {result.export_dir}")

    run_absl(main)


if __name__ == "__main__":
    run()
