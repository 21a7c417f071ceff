"""The Grain input pipeline: global batches independent of the host count, a seeded shuffle,
X0 drawn in the jitted step equal to the generator's noise, resume bit for bit (loader, checkpoint
and the whole trainer)."""

from __future__ import annotations

import json
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instaflow_jax.data.loader import ShuffledLoader
from instaflow_jax.data.triplets import TripletDataset
from instaflow_jax.testing import write_synthetic_triplets
from instaflow_jax.train.checkpoint import Checkpointer
from instaflow_jax.train.config import TrainConfig
from instaflow_jax.train.trainer import _dataset, _on_device, train_and_evaluate

SHAPE = (8, 8, 4)  # latents of 64×64 images (h, w, C)
SEED = 5


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    """22 synthetic triplets in shards of 5 (the last of 2): X0 stored, and not stored."""
    root = tmp_path_factory.mktemp("grain")
    return {
        "stored": write_synthetic_triplets(str(root / "stored"), 22, 5, SHAPE, SEED, store_x0=True),
        "regenerated": write_synthetic_triplets(str(root / "regenerated"), 22, 5, SHAPE, SEED),
    }


def take(loader: ShuffledLoader, count: int, state: dict | None = None) -> list[dict]:
    iterator = loader.iterator()
    if state is not None:
        loader.restore(iterator, state)
    return [next(iterator) for _ in range(count)]


def test_global_batches_are_identical_for_1_2_4_hosts(folders):
    """Host p of P reads the p-th slice of each global batch: concatenated, the hosts' batches
    (indices, prompts, latents) are the same for 1, 2 and 4 hosts, over an epoch boundary."""
    dataset = TripletDataset(folders["stored"])
    steps = 7  # 22 // 8 = 2 steps per epoch: three epochs and a bit
    merged = {}
    for hosts in (1, 2, 4):
        loaders = [
            ShuffledLoader(dataset, 8, seed=3, process_index=p, process_count=hosts) for p in range(hosts)
        ]
        batches = [take(loader, steps) for loader in loaders]
        assert all(len(b["index"]) == 8 // hosts for host in batches for b in host)
        merged[hosts] = [
            {
                key: np.concatenate([host[s][key] for host in batches])
                for key in ("index", "x1", "x0", "prompt")
            }
            for s in range(steps)
        ]
    for hosts in (2, 4):
        for step in range(steps):
            for key in ("index", "x1", "x0", "prompt"):
                np.testing.assert_array_equal(
                    merged[hosts][step][key], merged[1][step][key], f"{hosts} {step}"
                )
    first = merged[1][0]
    assert first["prompt"].tolist() == [f"prompt {i}" for i in first["index"]]
    np.testing.assert_array_equal(first["x1"], dataset.read(first["index"])["x1"])
    record = grain.MapDataset.source(dataset)[int(first["index"][1])]  # a RandomAccessDataSource
    np.testing.assert_array_equal(record["x1"], first["x1"][1])
    assert record["prompt"] == first["prompt"][1] and record["x1"].shape == SHAPE


def test_shuffle_is_a_seeded_permutation_reshuffled_every_epoch(folders):
    dataset = TripletDataset(folders["regenerated"])

    def epochs(seed: int, batch: int, count: int = 3, shuffle: bool = True) -> list[list[int]]:
        loader = ShuffledLoader(dataset, batch, seed=seed, shuffle=shuffle)
        order = np.concatenate([loader.batch_indices(s) for s in range(count * loader.steps_per_epoch)])
        return np.split(order, count)

    for one in epochs(seed=1, batch=2):  # 2 divides 22: every epoch is a permutation of all
        assert sorted(one.tolist()) == list(range(22)) and one.tolist() != list(range(22))
    for one in epochs(seed=1, batch=8):  # 16 of 22 per epoch, none twice
        assert len(set(one.tolist())) == 16
    a, b, c = epochs(1, 2), epochs(1, 2), epochs(2, 2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))  # same seed, same order
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[0], a[1])  # by seed, by epoch
    assert epochs(1, 2, shuffle=False)[1].tolist() == list(range(22))
    expected = grain.MapDataset.range(22).shuffle(seed=1)  # Grain's own global shuffle
    assert a[0].tolist() == [expected[i] for i in range(22)]


def test_x0_drawn_in_the_jitted_step_equals_the_generators_noise(folders):
    """The trainer reads no X0 when it is not stored and draws it from (manifest seed, index)
    inside the jitted step, bit for bit the stored noise of ``noise_for_indices``."""
    base = {"init_from": "unused", "height": 64, "width": 64, "data": {"path": folders["regenerated"]}}
    dataset, seed = _dataset(TrainConfig.from_config(base), SHAPE)
    assert seed == SEED and "x0" not in dataset.read(np.array([3]))
    stored_cfg = TrainConfig.from_config({**base, "data": {"path": folders["stored"]}})
    assert _dataset(stored_cfg, SHAPE)[1] is None  # stored X0 is used as stored

    def fake_step(state, frozen, batch):  # the train step sees batch["x0"]; fuse it into maths
        return batch["x0"], jnp.mean(jnp.square(batch["x1"] - batch["x0"])) + state

    step = jax.jit(_on_device(fake_step, seed, SHAPE))
    stored = TripletDataset(folders["stored"], regenerate_x0=False)
    indices = np.array([21, 0, 7, 13, 2, 9], np.int64)
    reference = stored.read(indices)
    batch = {"x1": dataset.read(indices)["x1"], "index": indices.astype(np.uint32)}
    x0, _ = step(jnp.float32(0), None, batch)
    np.testing.assert_array_equal(np.asarray(x0), reference["x0"])
    assert np.asarray(x0).dtype == np.float32 and np.asarray(x0).shape == (6, *SHAPE)


def test_iterator_state_in_a_checkpoint_resumes_the_same_order_on_any_host_count(folders, tmp_path):
    """Batches after a restore (through an orbax checkpoint) equal an uninterrupted stream's, on
    1 or 2 hosts; a checkpoint of another dataset size or batch is refused."""
    dataset = TripletDataset(folders["stored"])
    loader = ShuffledLoader(dataset, 4, seed=7)
    straight = take(loader, 9)
    iterator = loader.iterator()
    for _ in range(4):
        next(iterator)
    checkpointer = Checkpointer(str(tmp_path / "checkpoints"), keep=1, every=1)
    checkpointer.save(4, {"w": jnp.ones(3)}, {}, force=True, data=loader.state(iterator))
    checkpointer.close()
    _, meta = Checkpointer(str(tmp_path / "checkpoints")).restore(
        4, {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}
    )
    state = json.loads(json.dumps(meta["data"]))
    resumed = take(loader, 5, state)
    for a, b in zip(resumed, straight[4:]):
        for key in ("index", "x0", "x1", "prompt"):
            np.testing.assert_array_equal(a[key], b[key])
    halves = [
        take(ShuffledLoader(dataset, 4, seed=7, process_index=p, process_count=2), 5, state) for p in (0, 1)
    ]
    for step in range(5):
        np.testing.assert_array_equal(
            np.concatenate([halves[0][step]["x1"], halves[1][step]["x1"]]), straight[4 + step]["x1"]
        )
    with pytest.raises(ValueError, match=r"global_batch': 4.*global_batch': 2"):
        take(ShuffledLoader(dataset, 2, seed=7), 1, state)
    step, batch = next(loader(start_step=4))
    assert step == 4 and batch["index"].tolist() == straight[4]["index"].tolist()


def test_training_resumed_from_the_middle_equals_an_uninterrupted_run(tiny_pipeline_dir, folders, tmp_path):
    """4 steps straight (checkpoints at 2 and 4), then the step-4 checkpoint removed and the run
    resumed from step 2: the same losses and parameters bit for bit, the data position restored
    from the checkpoint. 22 samples in batches of 8: step 3 starts a new epoch (a reshuffle)."""
    config = {
        "objective": "reflow", "init_from": tiny_pipeline_dir, "height": 64, "width": 64,
        "data": {"kind": "triplets", "path": folders["regenerated"], "seed": 1}, "batch_size": 8,
        "dtype": "float32", "ema_decay": 0.9, "log_every": 1, "checkpoint_every": 2,
        "num_steps": 4, "optimizer": {"learning_rate": 1e-3, "warmup_steps": 0}, "sample": {"every": 0},
    }  # fmt: skip
    whole = train_and_evaluate(config, str(tmp_path))
    checkpoints = tmp_path / "checkpoints"
    saved = json.loads((checkpoints / "2" / "data" / "metadata").read_text())
    assert saved["grain"] == {"next_index": 2} and saved["global_batch"] == 8 and saved["num_samples"] == 22
    shutil.rmtree(checkpoints / "4")
    resumed = train_and_evaluate(config, str(tmp_path))
    assert sorted(resumed.losses) == [3, 4]
    assert [resumed.losses[s] for s in (3, 4)] == [whole.losses[s] for s in (3, 4)]
    for a, b in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(whole.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
