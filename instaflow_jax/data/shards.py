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

Visibility protocol: the ``.safetensors`` file is written to a temporary name unique to the
writer (``<name>.<pid>.<random>.tmp``) and renamed, then ``<shard>.json`` (indices, prompts, sha256
and size of the shard file) is written the same way. Readers only list shards that have a sidecar,
so a killed writer never exposes half a shard, and two writers of the same shard never collide.
Rows holding NaN or ±inf are refused by the writer and by every reader.

Integrity of the sidecar itself (format v2): its ``json_sha256`` field is the sha256 of all its
other fields as canonical JSON (``json_digest``), so an edited prompt or index is caught. A
sidecar must be named after its shard (``shard-000007.json`` holds ``"shard": 7``) and name its own
shard file (``"file": "shard-000007.safetensors"``), and the file's ``indices`` tensor must equal
the sidecar's indices: a sidecar can never lend its prompts to another shard's rows.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zlib
from collections.abc import Sequence
from typing import Any

import ml_dtypes
import numpy as np
from etils import epath

from instaflow_jax import files
from instaflow_jax.files import JSONFileError, contained_path, read_json
from instaflow_jax.weights import safetensors_io
from instaflow_jax.weights.safetensors_io import SafetensorsError, TensorInfo

ROW_TENSORS = ("x1", "x0")
CHECKSUM_FIELD = "json_sha256"  # in sidecars and manifests (format v2 on)
REBUILD = "Delete the shard and its .json, then re-run the generator to rebuild them."


class ShardError(ValueError):
    """A shard that is missing, truncated, corrupted or inconsistent with its sidecar."""


class NonFiniteError(ShardError):
    """Shard rows holding NaN or ±inf (refused on write and on read)."""


def shard_name(number: int) -> str:
    """``shard-000007`` for shard 7: the stem of its ``.safetensors`` file and its ``.json`` sidecar."""
    return f"shard-{number:06d}"


# A float is NaN or ±inf exactly when its exponent bits are all ones: an integer test, 8× faster
# than np.isfinite on float16 (which numpy converts element by element).
_EXPONENT_BITS = {
    np.dtype(np.float16): (np.uint16, 0x7C00),
    np.dtype(ml_dtypes.bfloat16): (np.uint16, 0x7F80),
    np.dtype(np.float32): (np.uint32, 0x7F800000),
}


def nonfinite_rows(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Positions (int64 [k]) of the rows with a NaN or ±inf in any row tensor (``x1``, ``x0``)."""
    names = [n for n in ROW_TENSORS if n in arrays]
    count = np.shape(arrays[names[0]])[0] if names else 0
    bad = np.zeros(count, bool)
    for name in names:
        value = np.asarray(arrays[name]).reshape(count, -1)
        if value.dtype in _EXPONENT_BITS:
            unsigned, mask = _EXPONENT_BITS[value.dtype]
            bad |= ((value.view(unsigned) & mask) == mask).any(axis=1)
        else:
            bad |= ~np.isfinite(value).all(axis=1)
    return np.flatnonzero(bad)


def json_digest(data: dict[str, Any]) -> str:
    """sha256 (hex) of ``data`` as canonical JSON: sorted keys, no spaces, UTF-8, no ASCII escapes."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


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


def write_shard(
    folder: epath.Path,
    number: int,
    arrays: dict[str, np.ndarray],
    indices: np.ndarray,
    prompts: Sequence[str],
) -> epath.Path:
    """Write shard ``number`` and then its sidecar; returns the shard file's path.

    Args:
      arrays: ``x1`` and optionally ``x0``, each [n, h, w, C] (float16/bfloat16/float32, NHWC).
      indices: int [n], the global sample indices; prompts: n strings.
    Raises:
      NonFiniteError: a row holds NaN or ±inf (nothing is written).
    """
    folder = epath.Path(folder)
    indices = np.asarray(indices, np.int64)
    path = folder / f"{shard_name(number)}.safetensors"
    rows = {np.shape(a)[0] for a in arrays.values()}
    if rows != {len(indices)} or len(prompts) != len(indices):
        raise ValueError(
            f"{path}: {len(indices)} indices, {len(prompts)} prompts and arrays of {sorted(rows)} rows; "
            "expected the same count for all."
        )
    bad = nonfinite_rows(arrays)
    if bad.size:
        raise NonFiniteError(
            f"{path}: refusing to write {bad.size} of {len(indices)} rows holding NaN or inf "
            f"(samples {indices[bad][:10].tolist()}{' …' if bad.size > 10 else ''}); a shard of "
            "non-finite latents would poison training. Find the cause upstream (the teacher's output)."
        )
    tensors = {**arrays, "indices": indices, "crc32": _row_crcs(arrays)}
    data = safetensors_io.to_bytes(tensors, metadata={"format": "instaflow_jax.triplets"})
    files.write_bytes_atomic(path, data)
    sidecar = {
        "shard": number,
        "file": path.name,
        "count": len(indices),
        "bytes": len(data),  # of the bytes written, not re-read: another writer may replace the file
        "sha256": hashlib.sha256(data).hexdigest(),
        "indices": indices.tolist(),
        "prompts": list(prompts),
    }
    write_json(folder / f"{shard_name(number)}.json", sidecar)
    return path


def write_json(path: epath.Path, data: dict[str, Any], checksum: bool = True) -> None:
    """Write ``data`` as JSON atomically, with its ``json_sha256`` checksum field added."""
    if checksum:
        data = {**data, CHECKSUM_FIELD: json_digest(data)}
    files.write_json_atomic(path, data, indent=1, ensure_ascii=False)


def read_checked_json(
    path: epath.Path, fix: str, checksum: bool, error: type[Exception] = ShardError
) -> dict[str, Any]:
    """A JSON object written by ``write_json``, without its checksum field; ``checksum`` requires
    the field and checks it (format v2), else it is ignored (v1). Raises ``error`` on a mismatch."""
    try:
        data = read_json(path, fix)
    except JSONFileError as err:
        raise error(str(err)) from err
    stored = data.pop(CHECKSUM_FIELD, None)
    if not checksum:
        return data
    if stored is None:
        raise error(
            f"{path} has no {CHECKSUM_FIELD} field, which this dataset's format requires: it was "
            f"replaced by hand or by an older version. {fix}"
        )
    if stored != json_digest(data):
        raise error(
            f"{path}: its contents do not match its checksum ({CHECKSUM_FIELD}): the file was edited "
            f"or damaged after it was written. {fix}"
        )
    return data


def _field(data: dict[str, Any], key: str, kind: type, path: epath.Path) -> Any:
    value = data.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ShardError(
            f"{path}: field {key!r} is {value!r}; expected a {kind.__name__}. The sidecar is damaged. "
            + REBUILD
        )
    return value


def read_sidecar(path: epath.Path, checksum: bool = True) -> dict[str, Any]:
    """Parse and check a shard sidecar (``checksum``: verify ``json_sha256``, format v2 on).

    Raises:
      ShardError: invalid JSON, a failed checksum, missing fields, or a sidecar that does not
        describe the shard it is named after.
    """
    path = epath.Path(path)
    data = read_checked_json(path, REBUILD, checksum)
    number, count = _field(data, "shard", int, path), _field(data, "count", int, path)
    indices, prompts = _field(data, "indices", list, path), _field(data, "prompts", list, path)
    _field(data, "bytes", int, path)
    _field(data, "sha256", str, path)
    if path.name != f"{shard_name(number)}.json":
        raise ShardError(
            f"{path} describes shard {number} ({shard_name(number)}.json); a sidecar must be named "
            f"after its own shard. {REBUILD}"
        )
    if data.get("file") != f"{shard_name(number)}.safetensors":
        raise ShardError(
            f"{path}: 'file' is {data.get('file')!r}; the sidecar of shard {number} must name its own "
            f"shard file {shard_name(number)}.safetensors. {REBUILD}"
        )
    if len(indices) != count or len(prompts) != count:
        raise ShardError(f"{path}: indices/prompts do not match count {count}. {REBUILD}")
    if not all(isinstance(i, int) for i in indices) or not all(isinstance(p, str) for p in prompts):
        raise ShardError(f"{path}: indices must be integers and prompts strings. {REBUILD}")
    return data


def shard_path(folder: epath.Path, sidecar: dict[str, Any]) -> epath.Path:
    """The shard file a sidecar names, checked to lie inside ``folder`` (no symlink leading out)."""
    source = epath.Path(folder) / f"{shard_name(sidecar['shard'])}.json"
    return contained_path(folder, sidecar["file"], source)


def check_size(folder: epath.Path, sidecar: dict[str, Any]) -> None:
    """Cheap check that a shard file exists with the size its sidecar recorded."""
    path = shard_path(folder, sidecar)
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


def _parse_header(path: epath.Path, f: Any, size: int, count: int) -> dict[str, TensorInfo]:
    """The shard's tensors, checked to be a triplet shard of ``count`` rows."""
    try:
        tensors, _ = safetensors_io.parse_header(f, size, os.fspath(path))
    except SafetensorsError as err:
        raise ShardError(f"{err} {REBUILD}") from err
    missing = sorted({"x1", "indices", "crc32"} - set(tensors))
    if missing:
        raise ShardError(f"{path}: tensors {missing} are missing; this is not a triplet shard. {REBUILD}")
    wrong = [
        name
        for name in (*ROW_TENSORS, "indices", "crc32")
        if name in tensors and tensors[name].shape[:1] != (count,)
    ]
    if wrong:
        raise ShardError(f"{path}: tensors {wrong} do not hold the {count} rows its sidecar lists. {REBUILD}")
    return tensors


def _check_indices(path: epath.Path, stored: np.ndarray, sidecar: dict[str, Any]) -> None:
    if stored.tolist() != sidecar["indices"]:
        raise ShardError(
            f"{path} holds samples {stored[:4].tolist()}…, its sidecar lists {sidecar['indices'][:4]}…: "
            f"the sidecar belongs to another shard or was edited. {REBUILD}"
        )


def verify_shard(folder: epath.Path, sidecar: dict[str, Any]) -> None:
    """Full check of a shard file against its sidecar: size, sha256, layout, indices, and every
    row finite. One read of the file; raises ShardError (NonFiniteError for NaN/inf rows)."""
    check_size(folder, sidecar)
    path = shard_path(folder, sidecar)
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sidecar["sha256"]:
        raise ShardError(f"{path}: sha256 differs from the sidecar's: the shard is corrupted. {REBUILD}")
    tensors = _parse_header(path, io.BytesIO(data), len(data), sidecar["count"])
    arrays = {
        name: np.frombuffer(data, info.dtype, int(np.prod(info.shape)), info.begin).reshape(info.shape)
        for name, info in tensors.items()
    }
    _check_indices(path, arrays["indices"], sidecar)
    bad = nonfinite_rows(arrays)
    if bad.size:
        raise NonFiniteError(
            f"{path}: {bad.size} of {sidecar['count']} rows hold NaN or inf (samples "
            f"{np.asarray(sidecar['indices'])[bad][:10].tolist()}): the shard was written without a "
            f"finiteness check. {REBUILD}"
        )


class ShardReader:
    """Row-level random access to one shard (header read once; each row checked by CRC32 and
    for NaN/inf)."""

    def __init__(self, folder: epath.Path, sidecar: dict[str, Any]):
        check_size(folder, sidecar)
        self.path = shard_path(folder, sidecar)
        self.count = int(sidecar["count"])
        with self.path.open("rb") as f:
            self.tensors = _parse_header(self.path, f, sidecar["bytes"], self.count)
        self.crc32 = self._read_all("crc32")
        _check_indices(self.path, self._read_all("indices"), sidecar)
        self.indices = np.asarray(sidecar["indices"], np.int64)
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
        """Rows (positions in this shard) → {"x1": [k, …], "x0": [k, …] if stored} in the stored
        dtypes; each row CRC-checked, all checked for NaN/inf."""
        rows = np.asarray(rows, np.int64)
        out = {
            name: np.empty((len(rows), *self.tensors[name].shape[1:]), self.tensors[name].dtype)
            for name in self.row_names
        }
        with self.path.open("rb") as f:
            for i, row in enumerate(rows):
                crc = 0
                for name in self.row_names:
                    target = out[name][i].reshape(-1).view(np.uint8)  # a view: writes into out
                    f.seek(self.tensors[name].begin + int(row) * target.size)
                    raw = f.read(target.size)  # read(), not readinto(): every epath backend has it
                    if len(raw) != target.size:
                        raise ShardError(
                            f"{self.path}: short read of row {int(row)}: the shard is truncated. {REBUILD}"
                        )
                    target[:] = np.frombuffer(raw, np.uint8)
                    crc = zlib.crc32(raw, crc)
                if crc != self.crc32[row]:
                    raise ShardError(
                        f"{self.path}: row {int(row)} fails its CRC32 check: the shard is corrupted. "
                        "Delete it and its .json, then re-run the generator to rebuild it."
                    )
        bad = nonfinite_rows(out)
        if bad.size:
            samples = self.indices[rows[bad]][:10].tolist()
            raise NonFiniteError(
                f"{self.path}: rows {rows[bad][:10].tolist()} (samples {samples}) hold NaN or inf "
                "although their CRC32 matches: the shard was written without a finiteness check. " + REBUILD
            )
        return out
