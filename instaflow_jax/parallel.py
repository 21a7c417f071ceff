"""Devices, meshes and shardings in one place; the persistent compilation cache.

Data parallelism is a 1-D ``Mesh`` with axis ``"data"``: batches are split along their first
axis, parameters are replicated. The same code runs on 1 CPU, 8 GPUs or a pod slice.
"""

from __future__ import annotations

import os
import time
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


def remat_compiler_options(remat: bool, backend: str | None = None) -> dict[str, str] | None:
    """XLA compile options a program with rematerialised blocks (``nn.remat``) needs here.

    XLA:CPU deletes optimization barriers (pass ``cse_barrier_expander``) *before* its last CSE
    pass, which then merges the recomputed forward back into the original one: ``remat`` saves
    nothing and ``memory_analysis()`` reports the program without it. Disabling that pass keeps the
    barriers, as XLA:GPU and XLA:TPU do until after scheduling. None (nothing to set) when
    ``remat`` is off or ``backend`` (default: JAX's default backend) is not ``"cpu"``. Pass it to
    ``jax.jit(..., compiler_options=...)`` at the jit site.
    """
    if remat and (backend or jax.default_backend()) == "cpu":
        return {"xla_disable_hlo_passes": "cse_barrier_expander"}
    return None


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


DEFAULT_INITIALIZATION_TIMEOUT_S = 900
DEFAULT_BARRIER_TIMEOUT_S = 1800


def initialize_distributed(
    coordinator_address: str = "",
    num_processes: int = 0,
    process_id: int = -1,
    cpu_collectives: str = "gloo",
    initialization_timeout_s: int = DEFAULT_INITIALIZATION_TIMEOUT_S,
) -> None:
    """``jax.distributed.initialize``: explicit arguments, or auto-detection (TPU pods, SLURM, …)
    when they are left empty. On CPU, cross-process collectives need ``gloo``.

    ``initialization_timeout_s`` is how long a process waits for all the others to connect to the
    coordinator (hosts of a pod or cluster rarely start within seconds of each other).
    """
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    kwargs: dict[str, Any] = {"initialization_timeout": int(initialization_timeout_s)}
    if coordinator_address:
        kwargs.update(
            coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
        )
    jax.distributed.initialize(**kwargs)


class ProcessBarrierTimeout(TimeoutError):
    """Some process did not reach a start-up barrier in time."""


def barrier(name: str, timeout_s: float = DEFAULT_BARRIER_TIMEOUT_S) -> None:
    """Wait until every process reaches the barrier ``name`` (a no-op with one process).

    Uses the distributed runtime's key-value service, not a device collective, so processes may
    arrive minutes apart (a slow compile, slow storage, a cold compilation cache on one host).
    Call it right before the first collective of a phase: CPU collectives (gloo) give up when
    the processes arrive more than ~30 s apart, and GPU/TPU collectives can hang silently.
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:  # pragma: no cover - process_count > 1 implies a client
        return
    start = time.monotonic()
    try:
        client.wait_at_barrier(f"instaflow_jax:{name}", int(timeout_s * 1000))
    except Exception as err:  # the runtime raises a generic XlaRuntimeError on timeout
        waited = time.monotonic() - start
        raise ProcessBarrierTimeout(
            f"process {jax.process_index()} of {jax.process_count()} waited {waited:.0f} s at the "
            f"'{name}' barrier and some process never arrived (crashed, or slower than the "
            f"{timeout_s:.0f} s timeout: slow compile, storage or cold cache). Check the other "
            f"processes' logs; raise distributed.barrier_timeout_s if a host is just slow. ({err})"
        ) from err


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
