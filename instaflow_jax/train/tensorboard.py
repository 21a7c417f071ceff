"""TensorBoard event files for a training run, through ``tensorboardX`` (no TensorFlow).

``workdir/tensorboard/`` receives, from process 0 only:

* scalars ``train/<name>`` (loss, lr, grad_norm and the objective's own metrics) and
  ``perf/<name>`` (step_time, images_per_s, compile_s, sample_s, checkpoint_s, trace_s, tflops,
  mfu; the ``*_s`` of side work are seconds spent since the previous logged step);
* the fixed-prompt sample grid as the image ``samples`` every ``sample.every`` steps;
* the flattened training config as hyper-parameters (HParams tab) and as JSON text.

The MFU estimate is ``flops / step_time / peak``: ``flops`` is XLA's count for the compiled train
step (``compiled.cost_analysis()["flops"]``, one device's partition of the program), ``peak`` the
dense bf16 peak of one chip from ``PEAK_FLOPS``. Where the device is not in the table (CPUs, other
GPUs) only the achieved ``tflops`` is logged; where XLA gives no count neither is. XLA counts a
loop body once, so with ``grad_accum`` > 1 (a scan over micro-batches) or an online teacher (an
ODE loop) both are lower bounds.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from instaflow_jax.image_io import to_uint8

# Dense bf16 peak FLOP/s of one chip (vendor data sheets), matched as lower-case substrings of
# ``jax.Device.device_kind`` in this order (the first match wins).
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("h100 pcie", 756e12),
    ("h100", 989e12),
    ("h200", 989e12),
    ("a100", 312e12),
    ("tpu v4", 275e12),
    ("tpu v5 lite", 197e12),  # v5e
    ("tpu v5", 459e12),  # v5p
    ("tpu v6 lite", 918e12),  # v6e (Trillium)
)
PERF_KEYS = (
    "step_time",
    "images_per_s",
    "compile_s",
    "sample_s",
    "checkpoint_s",
    "trace_s",
    "tflops",
    "mfu",
)


def peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of one device of this kind, or None when unknown (CPUs included)."""
    kind = device_kind.lower()
    return next((peak for name, peak in PEAK_FLOPS if name in kind), None)


def compiled_flops(compiled: Any) -> float | None:
    """XLA's FLOP count of a compiled program (one device's partition), or None if unavailable."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per partition
        analysis = analysis[0] if analysis else None
    flops = analysis.get("flops") if isinstance(analysis, dict) else None
    return float(flops) if flops and flops > 0 else None


def utilization(flops: float | None, step_time: float, peak: float | None) -> dict[str, float]:
    """``{"tflops": achieved TFLOP/s per device, "mfu": fraction of peak}``, each when known."""
    if not flops or step_time <= 0:
        return {}
    out = {"tflops": flops / step_time / 1e12}
    if peak:
        out["mfu"] = flops / step_time / peak
    return out


def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """Nested config → ``{"optimizer.learning_rate": 1e-6, …}``; lists become JSON strings."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_config(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value, default=str)
    return flat


class TensorBoardWriter:
    """Scalars, sample grids and hyper-parameters of a run as TensorBoard events in ``logdir``.

    Disabled (every method a no-op) on processes other than 0. On resume, ``resume_step`` makes
    TensorBoard drop events written after that step by the interrupted run.
    """

    def __init__(self, logdir: str, enabled: bool = True, resume_step: int = 0):
        self.logdir = logdir
        self.writer = None
        if enabled:
            from tensorboardX import SummaryWriter

            os.makedirs(logdir, exist_ok=True)
            self.writer = SummaryWriter(logdir, purge_step=resume_step or None, flush_secs=30)

    def hparams(self, config: dict[str, Any]) -> None:
        """The config as hyper-parameters (linked to ``train/loss``) and as JSON text."""
        if self.writer is None:
            return
        from tensorboardX.summary import hparams

        experiment, start, _ = hparams(flatten_config(config), {"train/loss": 0.0})
        self.writer.file_writer.add_summary(experiment)
        self.writer.file_writer.add_summary(start)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```", 0)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """``values`` as ``perf/<name>`` (timing keys of ``PERF_KEYS``) or ``train/<name>`` scalars."""
        if self.writer is None:
            return
        for name, value in values.items():
            group = "perf" if name in PERF_KEYS else "train"
            self.writer.add_scalar(f"{group}/{name}", float(value), step)

    def image(self, step: int, grid: np.ndarray, tag: str = "samples") -> None:
        """An image grid [H, W, 3] (float in [0, 1] or uint8, HWC) at ``step``."""
        if self.writer is None:
            return
        grid = np.asarray(grid)
        grid = grid if grid.dtype == np.uint8 else to_uint8(grid)
        self.writer.add_image(tag, grid, step, dataformats="HWC")
        self.writer.flush()

    def flush(self) -> None:
        """Write pending events to disk now."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file (later calls do nothing)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
