"""Deterministic, resumable, host-sharded shuffling over any random-access dataset.

A dataset is anything with ``__len__`` and ``read(indices) -> dict`` (triplets, prompts + noise,
toy images). Global batch ``b`` of epoch ``e = b // steps_per_epoch`` is the
``(b mod steps_per_epoch)``-th block of ``global_batch`` indices of a permutation seeded by
(seed, e); process ``p`` of ``P`` reads the ``p``-th of ``P`` equal slices. Incomplete final
blocks are dropped, so within an epoch every sample is read at most once (exactly once when
``global_batch`` divides the dataset), and iteration can start at any step: a resumed run sees
exactly the data an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np


class Dataset(Protocol):
    def __len__(self) -> int: ...

    def read(self, indices: np.ndarray) -> dict[str, Any]: ...


@dataclasses.dataclass
class ShuffledLoader:
    dataset: Dataset
    global_batch: int
    seed: int = 0
    shuffle: bool = True
    process_index: int = 0
    process_count: int = 1
    prefetch: int = 2  # batches read ahead in a background thread
    _order: tuple[int, np.ndarray] | None = dataclasses.field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.global_batch % self.process_count:
            raise ValueError(
                f"global_batch {self.global_batch} must be divisible by {self.process_count} processes."
            )
        if not 0 < self.global_batch <= len(self.dataset):
            raise ValueError(
                f"global_batch {self.global_batch} must lie in [1, {len(self.dataset)}] (the dataset size)."
            )

    @property
    def steps_per_epoch(self) -> int:
        return len(self.dataset) // self.global_batch

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.process_count

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The sample order of ``epoch`` (a permutation seeded by (seed, epoch); cached)."""
        if self._order is None or self._order[0] != epoch:
            n = len(self.dataset)
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order = (epoch, order)
        return self._order[1]

    def batch_indices(self, step: int) -> np.ndarray:
        """This process's sample indices of global batch ``step``."""
        epoch, position = divmod(step, self.steps_per_epoch)
        block = self.epoch_order(epoch)[position * self.global_batch : (position + 1) * self.global_batch]
        return block[self.process_index * self.local_batch : (self.process_index + 1) * self.local_batch]

    def __call__(self, start_step: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
        """Yield (step, host-local batch) from ``start_step`` on, forever, reading ahead."""
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = [
                pool.submit(self.dataset.read, self.batch_indices(s))
                for s in range(start_step, start_step + self.prefetch + 1)
            ]
            step = start_step
            while True:
                batch = pending.pop(0).result()
                pending.append(pool.submit(self.dataset.read, self.batch_indices(step + self.prefetch + 1)))
                yield step, batch
                step += 1
