"""Multi-process training: 2 processes × 2 devices with FSDP train like one process, with one host
reaching its first collective late (its own file so that it runs beside, not after, the others)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from test_training import _finish, _free_port, _run_training, config

from instaflow_jax.train.trainer import train_and_evaluate

# Adam's eps at 1e-4 keeps m/√v from magnifying last-bit differences of near-zero gradients.
ADAM = {"eps": 1e-4}


def _base(tiny_pipeline_dir, triplets) -> dict:
    return config(tiny_pipeline_dir, data={"path": triplets}, num_steps=3, batch_size=8, optimizer=ADAM)


@pytest.fixture(scope="module")
def one_process_reference(tiny_pipeline_dir, triplets, tmp_path_factory) -> str:
    """The one-process, one-device run the pair must equal: its trained UNet as ``.npz``."""
    from instaflow_jax.train.export import host_copy

    folder = tmp_path_factory.mktemp("one_process")
    single = train_and_evaluate(_base(tiny_pipeline_dir, triplets), str(folder / "run"))
    path = str(folder / "one.npz")
    np.savez(path, *[np.asarray(x) for x in jax.tree.leaves(host_copy(single.state.params))])
    return path


def test_one_process_reference_trains(one_process_reference, tiny_pipeline_dir):
    """The reference moved the weights (else the comparison below would be vacuous); it runs as
    its own test so that the exclusive one below does not train it while the other worker waits."""
    one = np.load(one_process_reference)
    initial = [
        np.asarray(x)
        for x in jax.tree.leaves(__import__("instaflow_jax").load_pipeline(tiny_pipeline_dir).params["unet"])
    ]
    assert len(one.files) == len(initial) > 0
    assert any(np.abs(one[k] - init).max() > 0 for k, init in zip(one.files, initial))


@pytest.mark.exclusive_cpu  # the distributed pair runs without competing processes
def test_two_fsdp_processes_equal_one_process(tiny_pipeline_dir, triplets, one_process_reference, tmp_path):
    """2 processes × 2 devices with FSDP-sharded parameters and optimizer state train like one
    process on one device, with one of the two processes reaching its first collective 35 s late
    (CPU collectives give up after 30 s without the start-up barriers)."""
    base = _base(tiny_pipeline_dir, triplets)
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
    one, two = np.load(one_process_reference), np.load(tmp_path / "two.npz")
    assert len(one.files) == len(two.files) > 0
    # One device and 2 × 2 devices sum gradients in different orders; Adam's m/√v turns those
    # last-bit differences into ≲ 1e-5 (a wrong shard or step would differ by ~lr = 2e-3).
    for key in one.files:
        np.testing.assert_allclose(two[key], one[key], rtol=1e-5, atol=3e-5)
