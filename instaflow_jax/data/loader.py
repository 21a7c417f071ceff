"""The input pipeline on Grain: global shuffle by seed, per-host slices, parallel reads, resumable.

A dataset is anything with ``__len__`` and ``read(indices) -> dict`` of arrays with a leading
batch axis (``TripletDataset`` — also a Grain ``RandomAccessDataSource`` —, prompts, toy images).
Global batch ``b`` is element ``b`` of ``MapDataset.range(N).shuffle(seed).batch(B,
drop_remainder=True).repeat()``: the ``(b mod S)``-th block of ``B`` indices of epoch
``e = b // S`` (``S = N // B`` steps per epoch) under Grain's index shuffle seeded ``seed + e``.
Process ``p`` of ``P`` reads the ``p``-th of ``P`` equal slices of every global batch, so global
batch ``b`` is the same whatever ``P``; within an epoch every sample is read at most once (once
when ``B`` divides ``N``). ``ReadOptions`` threads read ``prefetch`` host batches ahead.

The iterator's state (``state``/``restore``) is the number of global batches consumed plus what
fixes the order (dataset size, global batch, seed): the same on every process, so one copy in the
checkpoint resumes a run on any process count exactly where it stopped.

X0 is not read: ``add_initial_noise`` draws it inside the jitted step from each sample's global
index, bit-identical to the noise the triplet generator used (``sampling/noise.py``).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import grain
import jax
import numpy as np

from instaflow_jax.sampling.noise import initial_noise


class Dataset(Protocol):
    def __len__(self) -> int: ...

    def read(self, indices: np.ndarray) -> dict[str, Any]: ...


def global_batches(num_samples: int, global_batch: int, seed: int, shuffle: bool = True) -> grain.MapDataset:
    """Infinite Grain dataset whose element ``b`` is int64 [global_batch]: the sample indices of
    global batch ``b`` (reshuffled every epoch; incomplete final blocks dropped)."""
    order = grain.MapDataset.range(num_samples)
    if shuffle:
        order = order.shuffle(seed=seed)
    return order.batch(global_batch, drop_remainder=True).repeat()


@dataclasses.dataclass
class ShuffledLoader:
    """This process's batches of ``dataset``: ``transform(dataset.read(indices))`` per step."""

    dataset: Dataset
    global_batch: int
    seed: int = 0
    shuffle: bool = True
    process_index: int = 0
    process_count: int = 1
    prefetch: int = 8  # host batches read ahead
    # Grain read threads, each reading whole host batches: from local disk 2–4 is fastest (the
    # reads share one GIL); more only help when each read waits on storage (benchmarks/RESULTS.md).
    num_threads: int = 4
    transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None  # run in the read threads

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

    def global_indices(self) -> grain.MapDataset:
        """Element ``b``: int64 [global_batch], the sample indices of global batch ``b``."""
        return global_batches(len(self.dataset), self.global_batch, self.seed, self.shuffle)

    def batch_indices(self, step: int) -> np.ndarray:
        """int64 [local_batch]: this process's slice of global batch ``step``."""
        start = self.process_index * self.local_batch
        return np.asarray(self.global_indices()[step][start : start + self.local_batch])

    def _read(self, indices: np.ndarray) -> dict[str, Any]:
        start = self.process_index * self.local_batch
        batch = self.dataset.read(np.asarray(indices[start : start + self.local_batch], np.int64))
        return self.transform(batch) if self.transform is not None else batch

    def iterator(self) -> grain.DatasetIterator:
        """Grain iterator over this process's batches from step 0 (``restore`` moves it)."""
        options = grain.ReadOptions(num_threads=self.num_threads, prefetch_buffer_size=self.prefetch)
        return self.global_indices().map(self._read).to_iter_dataset(options).__iter__()

    def state(self, iterator: grain.DatasetIterator) -> dict[str, Any]:
        """JSON-able position of ``iterator`` (same on every process) and what fixes the order."""
        return {"grain": iterator.get_state(), **self._order()}

    def restore(self, iterator: grain.DatasetIterator, state: Mapping[str, Any]) -> None:
        """Move ``iterator`` to a position saved by ``state``.

        Raises:
          ValueError: the dataset size, global batch, seed or shuffle differ from the saved ones
            (the sample order would not continue).
        """
        saved = {key: state.get(key) for key in self._order()}
        if saved != self._order():
            raise ValueError(
                f"the checkpoint's data order was {saved}, this run's is {self._order()}: resuming would "
                "not continue the same sample order. Resume with the dataset and batch size it used."
            )
        iterator.set_state(state["grain"])

    def start_at(self, iterator: grain.DatasetIterator, step: int) -> None:
        """Move ``iterator`` to global batch ``step`` (checkpoints written before Grain)."""
        self.restore(iterator, {"grain": {"next_index": int(step)}, **self._order()})

    def _order(self) -> dict[str, Any]:
        return {
            "num_samples": len(self.dataset),
            "global_batch": self.global_batch,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def __call__(self, start_step: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
        """Yield (step, host batch) from ``start_step`` on, forever."""
        iterator = self.iterator()
        self.start_at(iterator, start_step)
        for step in itertools.count(start_step):
            yield step, next(iterator)


def add_initial_noise(
    batch: Mapping[str, jax.Array], seed: int, shape: tuple[int, int, int]
) -> dict[str, jax.Array]:
    """``batch`` plus ``x0`` float32 [B, *shape] (NHWC) drawn from ``batch["index"]`` [B] uint32.

    Traced inside the jitted train step; equal bit for bit to ``noise_for_indices(seed, index,
    shape)``, the generator's noise (tested in tests/test_grain_loader.py).
    """
    return {**batch, "x0": initial_noise(seed, batch["index"], shape)}
