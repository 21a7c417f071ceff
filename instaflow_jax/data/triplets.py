"""(prompt, X0, X1) triplet datasets: manifest, random-access reader, sharded shuffled loader.

A dataset folder holds ``manifest.json`` (how the data was made) and shards written by
``instaflow_jax.generate_triplets`` (format in ``data/shards.py``). The manifest records the
teacher (model, solver, steps, guidance, negative prompt, dtype), the latent geometry, scaling
and storage dtype, the seed, whether X0 is stored, and the prompt source; shard sidecars record
each sample's index and prompt. When X0 is not stored it is regenerated from
``fold_in(key(seed), index)`` with the very function the generator used.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
from etils import epath

from instaflow_jax.data.loader import ShuffledLoader
from instaflow_jax.data.shards import (
    ShardError,
    ShardReader,
    check_size,
    read_sidecar,
    shard_name,
    verify_shard,
)
from instaflow_jax.sampling.noise import noise_for_indices

FORMAT = "instaflow_jax.triplets"
VERSION = 1


def manifest_path(folder: str | epath.Path) -> epath.Path:
    return epath.Path(folder) / "manifest.json"


def read_manifest(folder: str | epath.Path) -> dict[str, Any]:
    path = manifest_path(folder)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: {folder} is not a triplet dataset (make one with "
            "`python -m instaflow_jax.generate_triplets --config ...`)."
        )
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        found = f"{manifest.get('format')} v{manifest.get('version')}"
        raise ValueError(f"{path}: format {found}, expected {FORMAT} v{VERSION}.")
    return manifest


def manifest_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable list of the fields where two manifests disagree."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += manifest_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} in the folder, {b!r} now")
    return out


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """Fixed assignment of global sample indices to shards: shard k = [k·S, min((k+1)·S, N))."""

    num_samples: int
    shard_size: int

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def indices(self, shard: int) -> np.ndarray:
        start = shard * self.shard_size
        return np.arange(start, min(start + self.shard_size, self.num_samples), dtype=np.int64)

    def shards_of_process(self, process_index: int, process_count: int) -> list[int]:
        """Shards this process writes: k ≡ process_index (mod process_count)."""
        return list(range(process_index, self.num_shards, process_count))


def list_complete_shards(folder: epath.Path) -> dict[int, dict[str, Any]]:
    """Sidecars of the shards that finished writing, by shard number."""
    sidecars = {}
    for path in sorted(epath.Path(folder).glob("shard-*.json")):
        sidecar = read_sidecar(path)
        sidecars[int(sidecar["shard"])] = sidecar
    return sidecars


class TripletDataset:
    """Random access to a finished triplet dataset.

    ``read(indices)`` returns ``x0``, ``x1`` (float32 [k, h, w, C], NHWC, model-scale latents),
    ``index`` (int64 [k]) and ``prompt`` (list of k strings). ``verify="checksum"`` hashes every
    shard on open (slow on big datasets); ``"size"`` (default) checks sizes and headers, and every
    row read is still checked against its CRC32.
    """

    def __init__(self, folder: str | epath.Path, verify: str = "size"):
        self.folder = epath.Path(folder)
        self.manifest = read_manifest(self.folder)
        self.plan = ShardPlan(self.manifest["num_samples"], self.manifest["shard_size"])
        self.sidecars = list_complete_shards(self.folder)
        missing = sorted(set(range(self.plan.num_shards)) - set(self.sidecars))
        if missing:
            names = ", ".join(shard_name(k) for k in missing[:5]) + (" …" if len(missing) > 5 else "")
            raise ShardError(
                f"{self.folder}: {len(missing)} of {self.plan.num_shards} shards are not finished ({names}). "
                "Run the generator again with the same command to complete the dataset."
            )
        if verify not in ("none", "size", "checksum"):
            raise ValueError(f"verify={verify!r}; expected 'none', 'size' or 'checksum'.")
        for sidecar in self.sidecars.values():
            if verify == "checksum":
                verify_shard(self.folder, sidecar)
            elif verify == "size":
                check_size(self.folder, sidecar)
        self.prompts = [p for k in range(self.plan.num_shards) for p in self.sidecars[k]["prompts"]]
        latent = self.manifest["latent"]
        self.latent_shape = (latent["height"], latent["width"], latent["channels"])
        self._readers: dict[int, ShardReader] = {}
        for k, sidecar in self.sidecars.items():
            if sidecar["indices"] != self.plan.indices(k).tolist():
                raise ShardError(f"{self.folder / sidecar['file']}: indices do not match the shard plan.")

    def __len__(self) -> int:
        return self.plan.num_samples

    def _reader(self, shard: int) -> ShardReader:
        if shard not in self._readers:
            self._readers[shard] = ShardReader(self.folder, self.sidecars[shard])
        return self._readers[shard]

    def read(self, indices: np.ndarray) -> dict[str, Any]:
        indices = np.asarray(indices, np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"sample indices must lie in [0, {len(self)}).")
        shards, rows = np.divmod(indices, self.plan.shard_size)
        parts: dict[str, list] = {}
        order = []
        for shard in np.unique(shards):
            where = np.flatnonzero(shards == shard)
            for name, value in self._reader(int(shard)).read_rows(rows[where]).items():
                parts.setdefault(name, []).append(value)
            order.append(where)
        inverse = np.argsort(np.concatenate(order)) if order else np.zeros(0, np.int64)
        out = {name: np.concatenate(values)[inverse].astype(np.float32) for name, values in parts.items()}
        if "x0" not in out:
            out["x0"] = np.asarray(noise_for_indices(self.manifest["seed"], indices, self.latent_shape))
        out["index"] = indices
        out["prompt"] = [self.prompts[i] for i in indices]
        return out


TripletLoader = ShuffledLoader  # the loader of triplet datasets (see data/loader.py)
