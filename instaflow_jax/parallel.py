"""Devices, meshes and shardings in one place; the persistent compilation cache.

Data parallelism is a 1-D ``Mesh`` with axis ``"data"``: batches are split along their first
axis, parameters are replicated. The same code runs on 1 CPU, 8 GPUs or a pod slice.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
CACHE_ENV = "INSTAFLOW_JAX_COMPILATION_CACHE"
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "instaflow_jax", "xla")


def make_mesh(devices: Sequence[Any] | None = None) -> Mesh:
    """A 1-D data-parallel mesh over ``devices`` (default: this process's local devices)."""
    devices = list(devices) if devices is not None else jax.local_devices()
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Split the leading (batch) axis over the mesh's data axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def padded_size(batch: int, mesh: Mesh) -> int:
    """Smallest multiple of the data-axis size that holds ``batch`` samples."""
    n = mesh.shape[DATA_AXIS]
    return -(-batch // n) * n


def pad_batch(x: np.ndarray, size: int) -> np.ndarray:
    """Repeat the last sample so the leading axis has ``size`` entries (results are trimmed)."""
    if x.shape[0] == size:
        return x
    return np.concatenate([x, np.repeat(x[-1:], size - x.shape[0], axis=0)], axis=0)


def enable_compilation_cache(path: str | None = None) -> str | None:
    """Turn on JAX's persistent compilation cache unless the user configured or disabled it.

    Directory: ``path``, else ``$INSTAFLOW_JAX_COMPILATION_CACHE``, else
    ``~/.cache/instaflow_jax/xla``. Setting the variable to ``off`` disables it. Returns the
    directory in use (None when disabled).
    """
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    chosen = path or os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR
    if chosen.lower() in ("off", "0", "none", "false"):
        return None
    os.makedirs(chosen, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", chosen)
    return chosen
