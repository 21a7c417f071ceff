"""Read and write ``.safetensors`` files with numpy alone (no torch), bfloat16 included.

Format: 8-byte little-endian header length N, N bytes of JSON header mapping tensor names to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into the data that follows), and an
optional ``"__metadata__"`` dict of strings. Every offset, size and dtype is checked when the
header is parsed, so a truncated or corrupted file fails with an error naming the file and the
tensor. Paths may be local or any ``etils.epath`` path (e.g. ``gs://``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Mapping
from typing import BinaryIO

import ml_dtypes
import numpy as np
from etils import epath

from instaflow_jax.files import atomic_open

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U32": np.dtype(np.uint32),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A ``.safetensors`` file that is truncated, corrupted or not a safetensors file."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: dtype, shape and absolute byte range [begin, end) in the file."""

    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def parse_header(f: BinaryIO, size: int, name: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check the header of an open file of ``size`` bytes: (tensors, metadata)."""
    head = f.read(8)
    if len(head) < 8:
        raise SafetensorsError(f"{name}: {size} bytes is too short to be a safetensors file.")
    (n,) = struct.unpack("<Q", head)
    if n > _MAX_HEADER or 8 + n > size:
        raise SafetensorsError(
            f"{name}: header length {n} does not fit in a file of {size} bytes; the file is "
            "truncated or not safetensors. Download or save it again."
        )
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SafetensorsError(f"{name}: the JSON header cannot be parsed ({err}).") from err
    if not isinstance(header, dict):
        raise SafetensorsError(f"{name}: the header is not a JSON object.")
    metadata = header.pop("__metadata__", None) or {}
    start, data_len, tensors = 8 + n, size - 8 - n, {}
    for key, info in header.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise SafetensorsError(f"{name}: tensor {key!r} has a malformed entry {info!r}.") from err
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end > data_len:
            raise SafetensorsError(
                f"{name}: tensor {key!r} ends at byte {end} of the data but the file holds only "
                f"{data_len} data bytes: the file is truncated. Download or save it again."
            )
        if end - begin != expected or begin < 0:
            raise SafetensorsError(
                f"{name}: tensor {key!r} claims {end - begin} bytes but dtype {info['dtype']} and "
                f"shape {list(shape)} need {expected}: the header is corrupted."
            )
        tensors[key] = TensorInfo(dtype, shape, start + begin, start + end)
    return tensors, metadata


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """(tensors, metadata) of a file, reading only its header."""
    path = epath.Path(path)
    with path.open("rb") as f:
        return parse_header(f, path.stat().length, os.fspath(path))


def load(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as numpy arrays (bfloat16 as ``ml_dtypes.bfloat16``)."""
    path = epath.Path(path)
    tensors, _ = read_header(path)
    if os.path.isfile(os.fspath(path)):  # local: memory-map, copy each tensor once
        mm = np.memmap(os.fspath(path), dtype=np.uint8, mode="r") if path.stat().length else None
        raw = lambda t: np.array(mm[t.begin : t.end]) if t.end > t.begin else np.zeros(0, np.uint8)
    else:
        data = np.frombuffer(path.read_bytes(), np.uint8)
        raw = lambda t: data[t.begin : t.end].copy()
    return {key: raw(t).view(t.dtype).reshape(t.shape) for key, t in tensors.items()}


def _layout(
    tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None
) -> tuple[bytes, list[np.ndarray]]:
    """(length prefix + header, C-contiguous arrays in file order) for ``tensors``."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    arrays, offset = [], 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        if arr.dtype not in _NAMES:
            raise ValueError(f"tensor {name!r}: dtype {arr.dtype} cannot be stored in safetensors.")
        header[name] = {
            "dtype": _NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
        arrays.append(arr)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # align the data to 8 bytes, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw, arrays


def to_bytes(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """The bytes of a safetensors file holding ``tensors`` (exactly what ``save`` writes)."""
    head, arrays = _layout(tensors, metadata)
    return b"".join([head, *(arr.tobytes() for arr in arrays)])


def save(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` atomically: a per-writer temporary file (``<name>.<pid>.<random>.tmp``),
    then a rename, so concurrent writers never collide and readers never see half a file."""
    head, arrays = _layout(tensors, metadata)
    with atomic_open(path, "wb") as f:
        f.write(head)
        for arr in arrays:
            f.write(arr.tobytes())
