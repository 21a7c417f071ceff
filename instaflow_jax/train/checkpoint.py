"""Checkpoints with orbax ``CheckpointManager``: async, keep-N, sharded restore.

A checkpoint holds the train state (step, params, EMA, optimizer state) and JSON metadata: the
training config and the data position (global batches consumed). Restoring into the shardings
of the current mesh lets a run continue on another device count.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, every: int = 500):
        self.every = every
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, config: dict[str, Any], force: bool = False) -> bool:
        """Start an async save at ``step`` when due (every ``every`` steps) or when forced."""
        if not force and (self.every <= 0 or step % self.every):
            return False
        if step in self.manager.all_steps():
            return False
        meta = {"config": config, "data_step": int(step), "saved_at": time.time(), "jax": jax.__version__}
        return self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """State restored into ``abstract_state``'s shapes, dtypes and shardings, and the metadata."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], restored["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def config_differences(saved: dict[str, Any], current: dict[str, Any], allowed: tuple[str, ...]) -> list[str]:
    """Top-level config keys that differ between a checkpoint and now (except ``allowed``)."""
    return [
        f"{key}: {saved.get(key)!r} in the checkpoint, {current.get(key)!r} now"
        for key in sorted(set(saved) | set(current))
        if key not in allowed and saved.get(key) != current.get(key)
    ]
