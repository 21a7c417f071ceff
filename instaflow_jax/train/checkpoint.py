"""Checkpoints with orbax ``CheckpointManager``: async, keep-N, sharded restore, verified.

A checkpoint holds the train state (step, params, EMA, optimizer state), the data iterator's
state (item ``data``, JSON: the Grain iterator's position and what fixes the sample order, the
same on every process, so one copy serves any process count) and JSON metadata: the training
config, the data position (global batches consumed) and a fingerprint of every array
of the state (two 32-bit position-weighted sums of its bits). Restoring
recomputes the fingerprints, so flipped bytes in a data file are caught; a checkpoint that is
damaged in any way (bad fingerprint, truncated or missing files, broken metadata) is moved to
``<checkpoints>.damaged/`` and the next older one is tried. Restoring into the shardings of the
current mesh lets a run continue on another device count.

Saving follows orbax's save-decision policy: every ``every`` steps, plus the step at which all
processes agree on a preemption (``jax.distributed``'s preemption service, which watches for
SIGTERM); the trainer forces a save at the last step and on a single-process SIGTERM.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from instaflow_jax.parallel import barrier

# Odd multipliers (golden-ratio and murmur3 constants) for the position-weighted bit sums.
_MIX = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D)


class CheckpointError(ValueError):
    """A checkpoint that fails verification, or none usable although the folder has some."""


def _leaf_bits(x: jax.Array) -> jax.Array:
    """The raw bits of ``x`` as a flat uint32 vector (one entry per ≤ 32-bit element)."""
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.bool_):
        x = x.astype(jnp.uint8)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    size = x.dtype.itemsize
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    unsigned = {4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).reshape(-1).astype(jnp.uint32)


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
    """uint32 [2]: Σ bits·w1(i) and Σ (bits ⊕ w2(i))·w3(i) mod 2³², with odd position weights.

    Any change of one element changes the first sum (its weight is odd, hence invertible mod
    2³²); several changes cancel in both only by chance (about 2⁻⁶⁴).
    """
    return _weighted_bit_sums(_leaf_bits(x), jnp)


def _weighted_bit_sums(bits: Any, xp: Any) -> Any:
    """The two sums of ``_leaf_fingerprint`` over flat uint32 ``bits``, with ``xp`` = jnp or numpy
    (integer arithmetic mod 2³² in both, so both give the same digits)."""
    u32 = xp.uint32
    i = xp.arange(bits.shape[0], dtype=u32)
    w1 = (i * u32(_MIX[0])) | u32(1)
    w3 = (i * u32(_MIX[2]) + u32(_MIX[1])) | u32(1)
    first = xp.sum(bits * w1, dtype=u32)
    second = xp.sum((bits ^ (i * u32(_MIX[1]))) * w3, dtype=u32)
    return xp.stack([first, second])


@jax.jit
def _fingerprints(tree: Any) -> Any:
    return jax.tree.map(_leaf_fingerprint, tree)


def _host_leaf_fingerprint(x: Any) -> np.ndarray:
    """``_leaf_fingerprint`` in numpy (the same sums mod 2³², so the same digits)."""
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    x = np.ascontiguousarray(np.asarray(x))
    if x.dtype == np.bool_:
        x = x.astype(np.uint8)
    unsigned = {4: np.uint32, 2: np.uint16, 1: np.uint8}[x.dtype.itemsize]
    return _weighted_bit_sums(x.reshape(-1).view(unsigned).astype(np.uint32), np)


def _on_host(leaf: Any) -> bool:
    """True for leaves whose bits are already in host memory (numpy, or fully addressable CPU
    arrays) and at most 32 bits wide: there numpy is as fast and needs no XLA compile."""
    if isinstance(leaf, jax.Array):
        if not leaf.is_fully_addressable or any(d.platform != "cpu" for d in leaf.devices()):
            return False
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return True
    return np.dtype(getattr(leaf, "dtype", np.asarray(leaf).dtype)).itemsize <= 4


def tree_fingerprint(tree: Any) -> dict[str, str]:
    """``{path: 16 hex digits}`` for every array leaf of ``tree`` (sharded arrays welcome).

    On accelerators (and for arrays spread over processes) computed on device, so only 8 bytes
    per leaf reach the host; for arrays already in host memory computed in numpy (same digits).
    """
    leaves = jax.tree.leaves(tree)
    if leaves and all(_on_host(leaf) for leaf in leaves):
        prints = jax.tree.map(_host_leaf_fingerprint, tree)
    else:
        prints = _fingerprints(tree)
    flat, _ = jax.tree_util.tree_flatten_with_path(prints)
    out = {}
    for path, value in flat:
        host = np.asarray(value.addressable_data(0) if isinstance(value, jax.Array) else value)
        out[jax.tree_util.keystr(path)] = f"{int(host[0]):08x}{int(host[1]):08x}"
    return out


def _warn(message: str) -> None:
    if jax.process_index() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = text if len(text) <= 160 else text[:157] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class Checkpointer:
    """Keep-``keep`` async checkpoints of a train state every ``every`` steps (0 = only forced)."""

    def __init__(self, directory: str, keep: int = 3, every: int = 500):
        if keep < 1:
            raise ValueError(f"keep_checkpoints must be ≥ 1 (got {keep}): a run needs one to resume from.")
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            should_save_fn=lambda step, _last: every > 0 and step % every == 0,
            enable_async_checkpointing=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def reached_preemption(self, step: int) -> bool:
        """True at the step all processes agreed to save at after a preemption notice."""
        return bool(self.manager.reached_preemption(step))

    def save(
        self,
        step: int,
        state: Any,
        config: dict[str, Any],
        force: bool = False,
        data: dict[str, Any] | None = None,
    ) -> bool:
        """Start an async save at ``step`` when the policy says so (interval or preemption) or
        when forced; ``data`` is the data iterator's state (JSON). Returns whether a save started."""
        if step in self.manager.all_steps():
            return False
        if not force and not self.manager.should_save(step):
            return False
        meta = {
            "config": config,
            "data_step": int(step),
            "saved_at": time.time(),
            "jax": jax.__version__,
            "fingerprint": tree_fingerprint(state),
        }
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data is not None:
            items["data"] = ocp.args.JsonSave(data)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """State restored into ``abstract_state``'s shapes, dtypes and shardings, and the metadata
        (with the data iterator's state under ``"data"`` when the checkpoint holds one).

        Raises ``CheckpointError`` when the arrays' fingerprints differ from the saved ones.
        """
        items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
        if os.path.isdir(os.path.join(self.directory, str(step), "data")):  # absent before Grain
            items["data"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        state, meta = restored["state"], dict(restored["meta"])
        if "data" in items:
            meta["data"] = restored["data"]
        saved = meta.get("fingerprint")
        if saved is None:
            _warn(
                f"checkpoint step {step} has no array fingerprints (an older version wrote it); not verified."
            )
            return state, meta
        now = tree_fingerprint(state)
        bad = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if bad:
            raise CheckpointError(f"{len(bad)} array(s) differ from their saved fingerprint, e.g. {bad[0]}")
        return state, meta

    def all_steps(self) -> list[int]:
        """The saved steps, oldest first."""
        return sorted(self.manager.all_steps())

    def read_meta(self, step: int) -> dict[str, Any]:
        """The JSON metadata of checkpoint ``step`` (config, data position, fingerprints) alone."""
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict[str, Any], int] | None:
        """The newest checkpoint that restores and verifies: (state, metadata, step), or None
        when there is none. Damaged ones are reported in one line each and moved aside."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        for step in steps:
            try:
                state, meta = self.restore(step, abstract_state)
            except Exception as err:
                moved = self._quarantine(step)
                older = [s for s in steps if s < step]
                then = f"falling back to step {older[0]}" if older else "no older checkpoint is left"
                _warn(f"checkpoint step {step} is damaged ({_short(err)}); moved to {moved}; {then}.")
                continue
            return state, meta, step
        if steps:
            raise CheckpointError(
                f"every checkpoint in {self.directory} was damaged (steps {sorted(steps)}); they were "
                f"moved to {self.directory}.damaged. Run again to start from scratch, or restore a "
                "backup of the checkpoints folder."
            )
        return None

    def _quarantine(self, step: int) -> str:
        """Move the step's folder to ``<directory>.damaged/<step>-<time>`` (process 0 only)."""
        destination = os.path.join(f"{self.directory}.damaged", f"{step}-{int(time.time())}")
        barrier(f"checkpoint-quarantine-{step}-before")
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), destination)
        barrier(f"checkpoint-quarantine-{step}-after")
        self.manager.reload()
        return destination

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def config_differences(saved: dict[str, Any], current: dict[str, Any], allowed: tuple[str, ...]) -> list[str]:
    """Top-level config keys that differ between a checkpoint and now (except ``allowed``)."""
    return [
        f"{key}: {saved.get(key)!r} in the checkpoint, {current.get(key)!r} now"
        for key in sorted(set(saved) | set(current))
        if key not in allowed and saved.get(key) != current.get(key)
    ]
