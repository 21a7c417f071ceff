"""Triplet shards: safetensors files with per-row checksums, made visible by a sidecar JSON.

Why this format. A training input pipeline needs *random access to single rows* (a shuffled
batch touches a different shard per sample) from local disks and cloud buckets alike.
safetensors gives fixed-size rows at known byte offsets behind a small JSON header, so one
sample is one ``seek`` + ``read`` through ``etils.epath`` (no decompression, no index to build),
and the files open with numpy, PyTorch or any safetensors reader. Each shard holds:

  * ``x1``      [n, h, w, C] float16/float32 — teacher latents (model scale, NHWC);
  * ``x0``      [n, h, w, C] — the initial noise, only when the dataset stores it;
  * ``indices`` [n] int64 — global sample indices;
  * ``crc32``   [n] uint32 — CRC32 of each sample's bytes (x1, then x0), checked on every read.

Visibility protocol: the ``.safetensors`` file is written to a temporary name and renamed, then
``<shard>.json`` (indices, prompts, sha256 and size of the shard file) is written the same way.
Readers only list shards that have a sidecar, so a killed writer never exposes half a shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from instaflow_jax.weights import safetensors_io
from instaflow_jax.weights.safetensors_io import SafetensorsError, TensorInfo

ROW_TENSORS = ("x1", "x0")


class ShardError(ValueError):
    """A shard that is missing, truncated, corrupted or inconsistent with its sidecar."""


def shard_name(number: int) -> str:
    return f"shard-{number:06d}"


def _row_crcs(arrays: dict[str, np.ndarray]) -> np.ndarray:
    names = [n for n in ROW_TENSORS if n in arrays]
    count = arrays[names[0]].shape[0]
    crcs = np.zeros(count, np.uint32)
    for row in range(count):
        crc = 0
        for name in names:
            crc = zlib.crc32(np.ascontiguousarray(arrays[name][row]).tobytes(), crc)
        crcs[row] = crc
    return crcs


def file_sha256(path: epath.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_shard(
    folder: epath.Path,
    number: int,
    arrays: dict[str, np.ndarray],
    indices: np.ndarray,
    prompts: Sequence[str],
) -> epath.Path:
    """Write shard ``number`` (arrays ``x1`` and optionally ``x0``) and then its sidecar."""
    folder = epath.Path(folder)
    path = folder / f"{shard_name(number)}.safetensors"
    tensors = {**arrays, "indices": np.asarray(indices, np.int64), "crc32": _row_crcs(arrays)}
    safetensors_io.save(path, tensors, metadata={"format": "instaflow_jax.triplets"})
    sidecar = {
        "shard": number,
        "file": path.name,
        "count": len(indices),
        "bytes": int(path.stat().length),
        "sha256": file_sha256(path),
        "indices": [int(i) for i in indices],
        "prompts": list(prompts),
    }
    write_json(folder / f"{shard_name(number)}.json", sidecar)
    return path


def write_json(path: epath.Path, data: Any) -> None:
    """Write JSON via a temporary file and a rename (never half-visible)."""
    # A name of its own per writer: processes of a multi-host job may write the same file at once.
    tmp = path.parent / f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)


def read_sidecar(path: epath.Path) -> dict[str, Any]:
    try:
        data = json.loads(epath.Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ShardError(f"{path}: the shard sidecar is not valid JSON ({err}).") from err
    if len(data.get("indices", ())) != data.get("count") or len(data.get("prompts", ())) != data.get("count"):
        raise ShardError(f"{path}: indices/prompts do not match count {data.get('count')}.")
    return data


def check_size(folder: epath.Path, sidecar: dict[str, Any]) -> None:
    """Cheap check that a shard file exists with the size its sidecar recorded."""
    path = epath.Path(folder) / sidecar["file"]
    if not path.exists():
        raise ShardError(
            f"{path} is missing but its sidecar exists; delete {sidecar['file']}'s .json and re-run."
        )
    size = path.stat().length
    if size != sidecar["bytes"]:
        raise ShardError(
            f"{path}: {size} bytes, the sidecar recorded {sidecar['bytes']}: the shard is truncated or "
            "was overwritten. Delete it and its .json, then re-run the generator to rebuild it."
        )


def verify_shard(folder: epath.Path, sidecar: dict[str, Any]) -> None:
    """Full check of a shard file against its sidecar (size and sha256); raises ShardError."""
    check_size(folder, sidecar)
    if file_sha256(epath.Path(folder) / sidecar["file"]) != sidecar["sha256"]:
        raise ShardError(
            f"{epath.Path(folder) / sidecar['file']}: sha256 differs from the sidecar's: the shard is "
            "corrupted. Delete it and its .json, then re-run the generator to rebuild it."
        )


class ShardReader:
    """Row-level random access to one shard (header read once; each row checked by CRC32)."""

    def __init__(self, folder: epath.Path, sidecar: dict[str, Any]):
        self.path = epath.Path(folder) / sidecar["file"]
        check_size(folder, sidecar)
        try:
            with self.path.open("rb") as f:
                self.tensors, _ = safetensors_io.parse_header(f, sidecar["bytes"], os.fspath(self.path))
        except SafetensorsError as err:
            raise ShardError(f"{err} Delete the shard and its .json, then re-run the generator.") from err
        self.count = int(sidecar["count"])
        self.crc32 = self._read_all("crc32")
        self.row_names = [n for n in ROW_TENSORS if n in self.tensors]

    def _read_range(self, info: TensorInfo, start: int, stop: int, f: Any) -> np.ndarray:
        row_bytes = (info.end - info.begin) // max(info.shape[0], 1)
        f.seek(info.begin + start * row_bytes)
        raw = f.read((stop - start) * row_bytes)
        if len(raw) != (stop - start) * row_bytes:
            raise ShardError(f"{self.path}: short read of rows {start}:{stop}: the shard is truncated.")
        return np.frombuffer(raw, info.dtype).reshape((stop - start, *info.shape[1:]))

    def _read_all(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        with self.path.open("rb") as f:
            return self._read_range(info, 0, info.shape[0], f)

    def read_rows(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Rows (positions in this shard) → {"x1": [k, …], "x0": [k, …] if stored}; CRC-checked."""
        rows = np.asarray(rows, np.int64)
        out = {name: [] for name in self.row_names}
        with self.path.open("rb") as f:
            for row in rows:
                crc = 0
                for name in self.row_names:
                    value = self._read_range(self.tensors[name], int(row), int(row) + 1, f)[0]
                    crc = zlib.crc32(value.tobytes(), crc)
                    out[name].append(value)
                if crc != self.crc32[row]:
                    raise ShardError(
                        f"{self.path}: row {int(row)} fails its CRC32 check: the shard is corrupted. "
                        "Delete it and its .json, then re-run the generator to rebuild it."
                    )
        return {name: np.stack(values) for name, values in out.items()}
