"""(prompt, X0, X1) triplet datasets: manifest, random-access reader, sharded shuffled loader.

A dataset folder holds ``manifest.json`` (how the data was made) and shards written by
``instaflow_jax.generate_triplets`` (format in ``data/shards.py``). The manifest records the
teacher (model, solver, steps, guidance, negative prompt, dtype), the latent geometry, scaling
and storage dtype, the seed, whether X0 is stored, and the prompt source; shard sidecars record
each sample's index and prompt. When X0 is not stored it is regenerated from
``fold_in(key(seed), index)`` with the very function the generator used.

Format versions: v2 (written now) adds a ``json_sha256`` checksum to the manifest and to every
sidecar, verified on open. v1 datasets (written before) still read — their shard files are
verified as before, and every other v2 check applies — but their prompts and manifest are not
checksummed, which a warning says once per dataset; regenerating one writes v2.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
from etils import epath

from instaflow_jax.data.shards import (
    ShardError,
    ShardReader,
    check_size,
    read_checked_json,
    read_sidecar,
    shard_name,
    verify_shard,
)
from instaflow_jax.sampling.noise import noise_for_indices

log = logging.getLogger(__name__)

FORMAT = "instaflow_jax.triplets"
VERSION = 2  # v2: checksummed manifest and sidecars
READABLE_VERSIONS = (1, 2)


class ManifestError(ValueError):
    """A dataset manifest that is damaged, edited, or of an unknown format or version."""


def manifest_path(folder: str | epath.Path) -> epath.Path:
    return epath.Path(folder) / "manifest.json"


def read_manifest(folder: str | epath.Path) -> dict[str, Any]:
    """The dataset's manifest (without its checksum field), checked: format, version, checksum.

    Raises:
      FileNotFoundError: no manifest; ManifestError: damaged, edited or unknown format/version.
    """
    path = manifest_path(folder)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: {folder} is not a triplet dataset (make one with "
            "`python -m instaflow_jax.generate_triplets --config ...`)."
        )
    fix = "Restore it, or regenerate the dataset into a new folder."
    peek = read_checked_json(path, fix, checksum=False, error=ManifestError)
    version = peek.get("version")
    if peek.get("format") != FORMAT or version not in READABLE_VERSIONS:
        found = f"{peek.get('format')} v{version}"
        raise ManifestError(
            f"{path}: format {found}; this version of instaflow-jax reads {FORMAT} "
            f"v{' and v'.join(map(str, READABLE_VERSIONS))}. Read it with the version that wrote it, "
            "or regenerate it."
        )
    if version >= 2:
        read_checked_json(path, fix, checksum=True, error=ManifestError)
    missing = [key for key in ("num_samples", "shard_size", "seed", "latent", "store_x0") if key not in peek]
    if missing:
        raise ManifestError(f"{path}: fields {missing} are missing. {fix}")
    return peek


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


def list_complete_shards(folder: epath.Path, checksum: bool = True) -> dict[int, dict[str, Any]]:
    """Sidecars of the shards that finished writing, by shard number (``checksum``: verify each
    sidecar's own checksum, as format v2 requires)."""
    sidecars = {}
    for path in sorted(epath.Path(folder).glob("shard-*.json")):
        sidecar = read_sidecar(path, checksum)
        sidecars[int(sidecar["shard"])] = sidecar
    return sidecars


class TripletDataset:
    """Random access to a finished triplet dataset (a Grain ``RandomAccessDataSource``).

    ``read(indices)`` returns ``x0``, ``x1`` (float32 [k, h, w, C], NHWC, model-scale latents),
    ``index`` (int64 [k]) and ``prompt`` (list of k strings); ``dataset[i]`` is sample ``i`` alone
    (``x0``, ``x1`` [h, w, C], ``index``, ``prompt``). X0 is read when stored, else regenerated
    from (seed, index) on the host. For the trainer, ``regenerate_x0=False`` leaves it out (the
    step draws it on device, ``loader.add_initial_noise``) and ``as_float32=False`` keeps the
    stored dtypes (float16 X1 for SD: half the bytes to copy, cast on device).

    The manifest's and every sidecar's own checksum are verified on open (format v2).
    ``verify="checksum"`` also hashes every shard and checks its indices and that every row is
    finite (slow on big datasets); ``"size"`` (default) checks sizes, and every row read is still
    checked against its CRC32 and for NaN/inf.
    """

    def __init__(
        self,
        folder: str | epath.Path,
        verify: str = "size",
        regenerate_x0: bool = True,
        as_float32: bool = True,
    ):
        self.folder = epath.Path(folder)
        self.regenerate_x0, self.as_float32 = regenerate_x0, as_float32
        self.manifest = read_manifest(self.folder)
        self.plan = ShardPlan(self.manifest["num_samples"], self.manifest["shard_size"])
        checksummed = self.manifest["version"] >= 2
        if not checksummed:
            log.warning(
                "%s was written by an older instaflow-jax (format v1): its shard files are verified, "
                "but its prompts and manifest carry no checksum. Regenerate it to get format v%d.",
                self.folder,
                VERSION,
            )
        self.sidecars = list_complete_shards(self.folder, checksummed)
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

    @property
    def stores_x0(self) -> bool:
        return bool(self.manifest["store_x0"])

    def __getitem__(self, index: int) -> dict[str, Any]:
        batch = self.read(np.array([index]))
        return {name: value[0] for name, value in batch.items()}

    def _reader(self, shard: int) -> ShardReader:
        if shard not in self._readers:
            self._readers[shard] = ShardReader(self.folder, self.sidecars[shard])
        return self._readers[shard]

    def read(self, indices: np.ndarray) -> dict[str, Any]:
        indices = np.asarray(indices, np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"sample indices must lie in [0, {len(self)}).")
        shards, rows = np.divmod(indices, self.plan.shard_size)
        out: dict[str, Any] = {}
        for shard in np.unique(shards):
            where = np.flatnonzero(shards == shard)
            for name, value in self._reader(int(shard)).read_rows(rows[where]).items():
                if name not in out:
                    out[name] = np.empty((len(indices), *value.shape[1:]), value.dtype)
                out[name][where] = value
        if self.as_float32:
            out = {name: value.astype(np.float32, copy=False) for name, value in out.items()}
        if "x0" not in out and self.regenerate_x0:
            out["x0"] = np.asarray(noise_for_indices(self.manifest["seed"], indices, self.latent_shape))
        out["index"] = indices
        out["prompt"] = [self.prompts[i] for i in indices]
        return out
