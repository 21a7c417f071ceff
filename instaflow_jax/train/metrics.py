"""Training metrics: JSON lines (one object per logged step) and a PNG plot of them."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from instaflow_jax.files import write_bytes_atomic


class MetricsWriter:
    """Appends ``{"step": …, name: value, …}`` lines to ``workdir/metrics.jsonl`` (process 0 only).

    On resume, lines after the resumed step are dropped first, so the file always reads as
    one uninterrupted run.
    """

    def __init__(self, workdir: str, enabled: bool = True, resume_step: int = 0):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = enabled
        if enabled and os.path.isfile(self.path):
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            write_bytes_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode("utf-8"))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a last line cut short by a killed writer is dropped."""
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not JSON; the file is damaged.") from None
    return records


def plot_metrics(path: str, out: str, keys: tuple[str, ...] = ("loss", "grad_norm", "lr")) -> str | None:
    """Plot ``keys`` of a metrics.jsonl against step into a PNG (None if there is nothing)."""
    records = read_metrics(path) if os.path.isfile(path) else []
    keys = tuple(k for k in keys if any(k in r for r in records))
    if not records or not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(r["step"], r[key]) for r in records if key in r and math.isfinite(r[key])]
        ax.plot([p[0] for p in points], [p[1] for p in points])
        ax.set_title(key)
        ax.set_xlabel("step")
        if key == "loss" and points and min(p[1] for p in points) > 0:
            ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
