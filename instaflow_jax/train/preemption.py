"""Preemption: on SIGTERM, save at the next step boundary and stop cleanly.

Cluster schedulers (TPU/GPU spot capacity, SLURM, Kubernetes) send SIGTERM some seconds before
they kill a job. With several processes, ``jax.distributed``'s preemption service receives it and
all processes agree on the step to save at (orbax's ``reached_preemption``); with one process a
Python signal handler records it. Either way the trainer checkpoints that step, waits for the
write to finish and returns, so running the same command again resumes without losing work.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import jax

from instaflow_jax.train.checkpoint import Checkpointer


class PreemptionWatch:
    """Context manager: ``should_stop(step)`` becomes True after a preemption notice.

    Args:
      checkpointer: asked for the multi-process sync point (orbax / JAX preemption service).
      signals: handled in single-process runs (the JAX service owns them with several processes).
    """

    def __init__(self, checkpointer: Checkpointer, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.checkpointer = checkpointer
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def __enter__(self) -> PreemptionWatch:
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def should_stop(self, step: int) -> bool:
        """Whether to checkpoint ``step`` now and stop (call once per step, on every process)."""
        if jax.process_count() > 1:
            return self.checkpointer.reached_preemption(step)
        return self.received is not None
