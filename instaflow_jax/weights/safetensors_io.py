"""Read and write ``.safetensors`` files with numpy alone (no torch), bfloat16 included.

Format: 8-byte little-endian header length N, N bytes of JSON header mapping tensor names to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into the data that follows), and an
optional ``"__metadata__"`` dict of strings. Every offset, size and dtype is checked on read so a
truncated or corrupted file fails with an error naming the file and the tensor.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping

import ml_dtypes
import numpy as np

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
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A ``.safetensors`` file that is truncated, corrupted or not a safetensors file."""


def read_header(path: str | os.PathLike) -> tuple[dict, int, int]:
    """Return (header dict, data start offset, file size) after checking the framing."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: {size} bytes is too short to be a safetensors file.")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise SafetensorsError(
                f"{path}: header length {n} does not fit in a file of {size} bytes; the file is "
                "truncated or not safetensors. Download or save it again."
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SafetensorsError(f"{path}: the JSON header cannot be parsed ({err}).") from err
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: the header is not a JSON object.")
    return header, 8 + n, size


def load(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as numpy arrays (bfloat16 as ``ml_dtypes.bfloat16``)."""
    header, start, size = read_header(path)
    header.pop("__metadata__", None)
    data_len = size - start
    mm = np.memmap(path, dtype=np.uint8, mode="r") if data_len else np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise SafetensorsError(f"{path}: tensor {name!r} has a malformed entry {info!r}.") from err
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end > data_len:
            raise SafetensorsError(
                f"{path}: tensor {name!r} ends at byte {end} of the data but the file holds only "
                f"{data_len} data bytes: the file is truncated. Download or save it again."
            )
        if end - begin != expected or begin < 0:
            raise SafetensorsError(
                f"{path}: tensor {name!r} claims {end - begin} bytes but dtype {info['dtype']} and "
                f"shape {list(shape)} need {expected}: the header is corrupted."
            )
        out[name] = np.array(mm[start + begin : start + end]).view(dtype).reshape(shape)
    return out


def save(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` (C-contiguous copies are made) atomically: temp file, then rename."""
    path = os.fspath(path)
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
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for arr in arrays:
            f.write(arr.tobytes())
    os.replace(tmp, path)
