"""Per-batch feature files, so an interrupted evaluation resumes where it stopped.

A folder holds ``manifest.json`` (what the features are of: model, prompts digest, seeds, sizes…)
and one ``batch-<index>.npz`` per batch of the evaluation, written atomically when the batch is
done. A rerun with the same manifest skips the batches already on disk; since every batch's noise
and prompts depend only on the global sample indices, the resumed run's numbers equal an
uninterrupted run's. Several processes may write into one (shared) folder: batch files never
collide.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np

from instaflow_jax.files import atomic_open, read_json, write_json_atomic

_BATCH_FILE = re.compile(r"^batch-(\d{6})\.npz$")


class FeatureFolderMismatchError(ValueError):
    """The folder holds features of another evaluation (a different manifest)."""


class FeatureShards:
    """Features of ``total`` samples in batches of ``batch_size``, in ``folder``.

    ``manifest`` (JSON-serialisable) must equal the one already in the folder, if any: features of
    another model, prompt set or setting are never mixed in.
    """

    def __init__(self, folder: str, total: int, batch_size: int, manifest: dict[str, Any]) -> None:
        self.folder, self.total, self.batch_size = folder, int(total), int(batch_size)
        self.manifest = json.loads(json.dumps({**manifest, "total": total, "batch_size": batch_size}))
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "manifest.json")
        if os.path.exists(path):
            found = read_json(path, fix="delete the folder to recompute its features")
            if found != self.manifest:
                changed = sorted(
                    k for k in set(found) | set(self.manifest) if found.get(k) != self.manifest.get(k)
                )
                raise FeatureFolderMismatchError(
                    f"{folder} holds features of another evaluation (differs in {changed}); use another "
                    "--out folder, or delete this one to start over."
                )
        else:
            write_json_atomic(path, self.manifest, indent=1)

    @property
    def num_batches(self) -> int:
        return -(-self.total // self.batch_size)

    def indices(self, batch: int) -> np.ndarray:
        """Global sample indices [≤ batch_size] of batch number ``batch``."""
        start = batch * self.batch_size
        return np.arange(start, min(start + self.batch_size, self.total))

    def path(self, batch: int) -> str:
        return os.path.join(self.folder, f"batch-{batch:06d}.npz")

    def done(self) -> set[int]:
        """Batch numbers whose feature files are on disk."""
        found = (_BATCH_FILE.match(name) for name in os.listdir(self.folder))
        return {int(m.group(1)) for m in found if m and int(m.group(1)) < self.num_batches}

    def todo(self, process_index: int = 0, process_count: int = 1) -> list[int]:
        """This process's missing batches (batches are dealt round-robin over processes)."""
        done = self.done()
        return [b for b in range(process_index, self.num_batches, process_count) if b not in done]

    def write(self, batch: int, arrays: dict[str, np.ndarray]) -> None:
        """Write batch ``batch``'s arrays (leading axis = its samples), atomically."""
        count = len(self.indices(batch))
        for name, value in arrays.items():
            if np.shape(value)[0] != count:
                raise ValueError(f"batch {batch}: {name} has {np.shape(value)[0]} rows, expected {count}.")
        with atomic_open(self.path(batch)) as f:
            np.savez(f, **{name: np.asarray(value) for name, value in arrays.items()})

    def read(self) -> dict[str, np.ndarray]:
        """All batches concatenated in sample order; every batch must be done."""
        missing = sorted(set(range(self.num_batches)) - self.done())
        if missing:
            raise RuntimeError(f"{self.folder}: batches {missing[:5]} are not done yet.")
        parts: dict[str, list[np.ndarray]] = {}
        for batch in range(self.num_batches):
            with np.load(self.path(batch)) as data:
                for name in data.files:
                    parts.setdefault(name, []).append(data[name])
        return {name: np.concatenate(values) for name, values in parts.items()}
