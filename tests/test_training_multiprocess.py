"""Multi-process training: 2 processes × 2 devices with FSDP train like one process, with one host
reaching its first collective late (its own file so that it runs beside, not after, the others)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from test_training import _finish, _free_port, _run_training, config

from instaflow_jax.train.trainer import train_and_evaluate


@pytest.mark.exclusive_cpu  # the distributed pair runs without competing processes
def test_two_fsdp_processes_equal_one_process(tiny_pipeline_dir, triplets, tmp_path):
    """2 processes × 2 devices with FSDP-sharded parameters and optimizer state train like one
    process on one device, with one of the two processes reaching its first collective 35 s late
    (CPU collectives give up after 30 s without the start-up barriers)."""
    # Adam's eps at 1e-4 keeps m/√v from magnifying last-bit differences of near-zero gradients.
    adam = {"eps": 1e-4}
    base = config(tiny_pipeline_dir, data={"path": triplets}, num_steps=3, batch_size=8, optimizer=adam)
    single = train_and_evaluate(base, str(tmp_path / "one"))
    from instaflow_jax.train.export import host_copy

    np.savez(tmp_path / "one.npz", *[np.asarray(x) for x in jax.tree.leaves(host_copy(single.state.params))])
    # The distributed pair runs alone: no third process competes for the two cores.
    port = _free_port()
    pair = []
    for pid in (0, 1):
        distributed = {
            "enabled": True,
            "coordinator_address": f"127.0.0.1:{port}",
            "num_processes": 2,
            "process_id": pid,
            "barrier_timeout_s": 300,
        }
        cfg = {**base, "fsdp": True, "distributed": distributed}
        proc = _run_training(cfg, str(tmp_path / "two"), str(tmp_path / "two.npz"), 2, delay_s=35.0 * pid)
        pair.append((f"process {pid} of 2", proc))
    _finish(pair)
    one, two = (np.load(tmp_path / f"{n}.npz") for n in ("one", "two"))
    assert len(one.files) == len(two.files) > 0
    initial = [
        np.asarray(x)
        for x in jax.tree.leaves(__import__("instaflow_jax").load_pipeline(tiny_pipeline_dir).params["unet"])
    ]
    assert any(
        np.abs(one[k] - init).max() > 0 for k, init in zip(one.files, initial)
    )  # training moved the weights
    # One device and 2 × 2 devices sum gradients in different orders; Adam's m/√v turns those
    # last-bit differences into ≲ 1e-5 (a wrong shard or step would differ by ~lr = 2e-3).
    for key in one.files:
        np.testing.assert_allclose(two[key], one[key], rtol=1e-5, atol=3e-5)
