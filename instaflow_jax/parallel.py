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


def initialize_distributed(
    coordinator_address: str = "",
    num_processes: int = 0,
    process_id: int = -1,
    cpu_collectives: str = "gloo",
) -> None:
    """``jax.distributed.initialize``: explicit arguments, or auto-detection (TPU pods, SLURM, …)
    when they are left empty. On CPU, cross-process collectives need ``gloo``."""
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    kwargs: dict[str, Any] = {}
    if coordinator_address:
        kwargs = {
            "coordinator_address": coordinator_address,
            "num_processes": num_processes,
            "process_id": process_id,
        }
    jax.distributed.initialize(**kwargs)


def fsdp_spec(shape: tuple[int, ...], mesh: Mesh, min_size: int = 2**16) -> PartitionSpec:
    """Shard the largest axis divisible by the data-axis size (FSDP/ZeRO-3 style); replicate
    small or indivisible arrays."""
    n = mesh.shape[DATA_AXIS]
    if n == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return PartitionSpec()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % n == 0:
            spec = [None] * len(shape)
            spec[axis] = DATA_AXIS
            return PartitionSpec(*spec)
    return PartitionSpec()


def tree_shardings(tree: Any, mesh: Mesh, fsdp: bool) -> Any:
    """NamedShardings for every leaf of ``tree``: FSDP-sharded or replicated."""
    if not fsdp:
        return jax.tree.map(lambda _: replicated(mesh), tree)
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), mesh)), tree)


def place(tree: Any, shardings: Any) -> Any:
    """Host values (the same on every process) → global arrays with ``shardings``.

    Works with several processes: each fills its addressable shards from its own copy.
    """

    def put(value: Any, sharding: NamedSharding) -> jax.Array:
        host = np.asarray(value)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree, shardings)


def global_batch(local: Any, mesh: Mesh) -> Any:
    """Each process's slice of a batch (leading axis) → global arrays sharded over the data axis."""
    sharding = batch_sharded(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local)
