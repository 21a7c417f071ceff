"""Safe file I/O: atomic writes, JSON that names its file when broken, paths kept in their folder.

* Writes go to a temporary sibling named ``<name>.<pid>.<random>.tmp`` — unique per writer, so
  two processes (or threads) writing the same file never share a temporary — which is then
  renamed over the target (``os.replace`` locally, atomic on POSIX; ``epath`` for buckets, where
  an object only appears once complete). Readers see the old file or the new one, never a mix.
* ``read_json`` turns a damaged JSON file into one error naming the file, the position, what is
  wrong and what to do.
* ``contained_path`` resolves a file name read from a manifest, sidecar or index: it must stay
  inside its folder (no absolute path, no ``..``, no symlink leading out).

Paths may be local or any ``etils.epath`` path (``gs://``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import uuid
from collections.abc import Iterator, Sequence
from typing import IO, Any

from etils import epath


class JSONFileError(ValueError):
    """A JSON file that cannot be parsed or does not hold the expected JSON object."""


class UnsafePathError(ValueError):
    """A file name read from a data file that would lead outside its folder."""


class FolderNotWritableError(ValueError):
    """An output folder that cannot be created or written to."""


def is_local(path: str | os.PathLike) -> bool:
    """True for a path of the local filesystem (not ``gs://`` or another URL scheme)."""
    return "://" not in os.fspath(path)


def temporary_path(path: str | os.PathLike) -> epath.Path:
    """A sibling of ``path`` unique to this writer: ``<name>.<pid>.<random>.tmp``."""
    path = epath.Path(path)
    return path.parent / f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a per-writer temporary file that replaces ``path`` when the block ends without error.

    Local files are flushed to disk (``fsync``) before the rename. On error the temporary file
    is removed and ``path`` is left as it was.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}.")
    path = epath.Path(path)
    tmp = temporary_path(path)
    try:
        with tmp.open(mode, encoding=encoding) as f:
            yield f
            if is_local(tmp):
                f.flush()
                os.fsync(f.fileno())
        if is_local(tmp):
            os.replace(os.fspath(tmp), os.fspath(path))
        else:
            tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a per-writer temporary file and a rename."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_json_atomic(path: str | os.PathLike, data: Any, **dumps_kwargs: Any) -> None:
    """Write ``data`` as UTF-8 JSON (``json.dumps`` keyword arguments apply) atomically."""
    write_bytes_atomic(path, json.dumps(data, **dumps_kwargs).encode("utf-8"))


def read_json(path: str | os.PathLike, fix: str) -> dict[str, Any]:
    """Parse a JSON file that must hold an object; errors name the file and end with ``fix``.

    Raises:
      JSONFileError: the file is empty, not UTF-8, not JSON, or not a JSON object.
    """
    path = epath.Path(path)
    raw = path.read_bytes()
    if not raw.strip():
        raise JSONFileError(f"{path} is empty ({len(raw)} bytes); expected a JSON object. {fix}")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise JSONFileError(
            f"{path} is not UTF-8 text (byte {err.start} is {raw[err.start : err.start + 1]!r}), so "
            f"not JSON: the file is damaged. {fix}"
        ) from err
    except json.JSONDecodeError as err:
        raise JSONFileError(
            f"{path} is not valid JSON ({err.msg}: line {err.lineno}, column {err.colno} of "
            f"{len(raw)} bytes): the file is damaged, truncated or was mis-edited. {fix}"
        ) from err
    if not isinstance(data, dict):
        raise JSONFileError(f"{path} holds a JSON {type(data).__name__}; expected a JSON object {{…}}. {fix}")
    return data


_DRIVE = re.compile(r"^[A-Za-z]:")


def contained_path(
    folder: str | os.PathLike, name: Any, source: str | os.PathLike, also_inside: Sequence[str] = ()
) -> epath.Path:
    """``folder / name`` for a relative file name read from ``source``, checked to stay inside.

    ``name`` must be a non-empty relative path with no ``..`` component, no absolute or drive
    prefix and no URL scheme. Locally, the resolved path (symlinks followed) must also lie inside
    the resolved ``folder`` or one of the ``also_inside`` folders (e.g. a Hugging Face cache's
    ``blobs/``, which its snapshot files link to).

    Raises:
      UnsafePathError: naming ``source``, the entry and what was expected.
    """
    expected = "a file name relative to its folder (no absolute path, no '..', no URL)"
    if not isinstance(name, str) or not name.strip():
        raise UnsafePathError(f"{source}: file entry {name!r} is not a file name; expected {expected}.")
    parts = re.split(r"[/\\]", name)
    if name.startswith(("/", "\\")) or _DRIVE.match(name) or "://" in name or os.path.isabs(name):
        problem = "an absolute path"
    elif any(part in ("", "..") for part in parts):
        problem = "'..' or an empty path component"
    else:
        problem = None
    if problem:
        raise UnsafePathError(
            f"{source}: file entry {name!r} is {problem}, which could read files outside "
            f"{folder}; expected {expected}. The file is damaged or was edited: restore or regenerate it."
        )
    path = epath.Path(folder) / name
    if is_local(path):
        real = os.path.realpath(os.fspath(path))
        roots = [os.path.realpath(os.fspath(folder)), *(os.path.realpath(r) for r in also_inside)]
        if not any(os.path.commonpath([real, root]) == root for root in roots):
            raise UnsafePathError(
                f"{source}: file entry {name!r} is a symbolic link to {real}, outside {folder}; "
                "data files must lie inside their folder. Copy the file into the folder instead."
            )
    return path


def ensure_writable_folder(folder: str | os.PathLike, what: str) -> epath.Path:
    """Create ``folder`` if needed and prove it writable with a probe file (local or bucket).

    Raises:
      FolderNotWritableError: saying which setting (``what``) to change.
    """
    folder = epath.Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = temporary_path(folder / ".write-probe")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        reason = f"{type(err).__name__}: {err.strerror or err}"
        raise FolderNotWritableError(
            f"{what} {folder} cannot be written ({reason}). Choose a folder you can write to, or "
            "fix its permissions, then run again."
        ) from err
    return folder


FINGERPRINT_BYTES = 4 << 20  # read from each end of a file


def fingerprint(path: str | os.PathLike) -> str:
    """A short identity of a weights file, or of a folder's files (names, sizes and bytes): sha256
    (16 hex digits) of each file's size and of its first and last 4 MiB (all of a smaller file).
    Cheap on gigabyte checkpoints; it tells apart weights that differ (not a checksum)."""
    path = os.fspath(path)
    files = sorted(os.path.join(path, n) for n in os.listdir(path)) if os.path.isdir(path) else [path]
    digest = hashlib.sha256()
    for name in (f for f in files if os.path.isfile(f)):
        size = os.path.getsize(name)
        digest.update(f"{os.path.basename(name)}:{size}\n".encode())
        with open(name, "rb") as f:
            digest.update(f.read(FINGERPRINT_BYTES))
            if size > 2 * FINGERPRINT_BYTES:
                f.seek(size - FINGERPRINT_BYTES)
            digest.update(f.read(FINGERPRINT_BYTES))
    return digest.hexdigest()[:16]
