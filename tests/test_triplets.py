"""Triplet generation and reading: determinism, resume after a kill, corruption, sharded reading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import instaflow_jax
from instaflow_jax.data.shards import ShardError
from instaflow_jax.data.triplets import TripletDataset, TripletLoader
from instaflow_jax.generate_triplets import generate_triplets
from instaflow_jax.sampling.noise import noise_for_indices

PROMPTS = [f"a {size} {color} circle" for size in ("small", "big") for color in ("red", "blue", "green")]
PROMPTS += [
    f"a photo of a {animal}"
    for animal in ("cat", "dog", "horse", "cat with a hat", "dog on a hat", "horse at the top")
]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def job(tiny_pipeline_dir: str, prompt_file: str, output_dir, **overrides) -> dict:
    config = {
        "teacher": {
            "model": tiny_pipeline_dir, "solver": "dpmpp2m", "num_steps": 3, "guidance_scale": 3.0,
            "negative_prompt": "", "dtype": "float32", "param_dtype": "float32",
        },
        "prompts": {"kind": "text", "path": prompt_file},
        "output_dir": str(output_dir), "height": 64, "width": 64, "seed": 5, "shard_size": 5,
        "per_device_batch": 2, "latent_dtype": "float32", "store_x0": False,
    }  # fmt: skip
    for key, value in overrides.items():
        if key.startswith("teacher_"):
            config["teacher"][key[len("teacher_") :]] = value
        else:
            config[key] = value
    return config


def folder_bytes(folder) -> dict[str, bytes]:
    names = sorted(n for n in os.listdir(folder) if n.endswith((".safetensors", ".json")))
    return {name: (Path(folder) / name).read_bytes() for name in names}


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    assert len(set(PROMPTS)) == 12
    return str(path)


@pytest.fixture(scope="module")
def reference(tiny_pipeline_dir, prompt_file, tmp_path_factory):
    """One uninterrupted single-device, single-process run: 12 samples in shards of 5, 5, 2."""
    out = tmp_path_factory.mktemp("reference")
    generate_triplets(job(tiny_pipeline_dir, prompt_file, out))
    return str(out)


def test_layout_and_manifest(reference):
    names = sorted(os.listdir(reference))
    assert names == ["manifest.json"] + [
        f"shard-00000{k}.{ext}" for k in range(3) for ext in ("json", "safetensors")
    ]
    manifest = json.loads((Path(reference) / "manifest.json").read_text())
    assert manifest["teacher"]["solver"] == "dpmpp2m" and manifest["teacher"]["guidance_scale"] == 3.0
    assert manifest["latent"] == {
        "height": 8, "width": 8, "channels": 4, "layout": "NHWC", "scaling_factor": 0.18215,
        "dtype": "float32", "x0_dtype": "float32",
    }  # fmt: skip
    assert manifest["num_samples"] == 12 and manifest["seed"] == 5 and manifest["store_x0"] is False
    sidecar = json.loads((Path(reference) / "shard-000002.json").read_text())
    assert sidecar["indices"] == [10, 11] and sidecar["prompts"] == PROMPTS[10:]


def test_stored_x1_is_the_teacher_samplers_output(reference, tiny_pipeline_dir):
    dataset = TripletDataset(reference)
    batch = dataset.read(np.array([7, 2]))
    pipe = instaflow_jax.load_pipeline(tiny_pipeline_dir)
    noise = np.asarray(noise_for_indices(5, np.array([7, 2]), (8, 8, 4)))
    np.testing.assert_array_equal(batch["x0"], noise)
    expected = pipe.generate(
        [PROMPTS[7], PROMPTS[2]], num_steps=3, guidance_scale=3.0, solver="dpmpp2m",
        latents=noise.transpose(0, 3, 1, 2), height=64, width=64, output_type="latent",
    ).transpose(0, 2, 3, 1)  # fmt: skip
    np.testing.assert_allclose(batch["x1"], expected, atol=1e-5)
    assert batch["prompt"] == [PROMPTS[7], PROMPTS[2]] and batch["index"].tolist() == [7, 2]


def test_four_devices_give_a_bit_identical_dataset(reference, tiny_pipeline_dir, prompt_file, tmp_path):
    config = job(tiny_pipeline_dir, prompt_file, tmp_path / "four")
    script = textwrap.dedent(
        f"""
        import jax
        from instaflow_jax.generate_triplets import generate_triplets
        assert jax.local_device_count() == 4
        generate_triplets({config!r})
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=600)
    assert folder_bytes(tmp_path / "four") == folder_bytes(reference)


def test_two_processes_split_the_shards_and_give_the_same_dataset(
    reference, tiny_pipeline_dir, prompt_file, tmp_path
):
    config = job(tiny_pipeline_dir, prompt_file, tmp_path / "hosts")
    generate_triplets(config, process_index=1, process_count=2)
    assert sorted(n for n in os.listdir(tmp_path / "hosts") if n.endswith(".json")) == [
        "manifest.json",
        "shard-000001.json",
    ]
    generate_triplets(config, process_index=0, process_count=2)
    assert folder_bytes(tmp_path / "hosts") == folder_bytes(reference)


def test_killed_mid_shard_and_resumed_equals_uninterrupted(
    reference, tiny_pipeline_dir, prompt_file, tmp_path
):
    """SIGKILL while the second shard's file is half written; the same command then finishes."""
    config = job(tiny_pipeline_dir, prompt_file, tmp_path / "killed")
    script = textwrap.dedent(
        f"""
        import os, signal
        from instaflow_jax.weights import safetensors_io
        from instaflow_jax.generate_triplets import generate_triplets
        real_save, calls = safetensors_io.save, []
        def save(path, tensors, metadata=None):
            calls.append(path)
            if len(calls) == 2:  # half of shard 1 on disk under its temporary name, then die
                with open(str(path) + ".tmp", "wb") as f:
                    f.write(b"partial bytes")
                os.kill(os.getpid(), signal.SIGKILL)
            real_save(path, tensors, metadata)
        safetensors_io.save = save
        generate_triplets({config!r})
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=600
    )
    assert result.returncode == -9  # really killed
    left = sorted(os.listdir(tmp_path / "killed"))
    assert (
        "shard-000000.json" in left
        and "shard-000001.json" not in left
        and "shard-000001.safetensors.tmp" in left
    )
    with pytest.raises(ShardError, match=r"1 of 3 shards|2 of 3 shards"):
        TripletDataset(tmp_path / "killed")  # readers refuse an unfinished dataset
    generate_triplets(config)
    assert folder_bytes(tmp_path / "killed") == folder_bytes(reference)


def test_shard_file_without_sidecar_is_rebuilt(reference, tiny_pipeline_dir, prompt_file, tmp_path):
    """A kill between the shard's rename and its sidecar leaves an invisible shard: rebuilt."""
    import shutil

    folder = shutil.copytree(reference, tmp_path / "copy")
    os.remove(folder / "shard-000002.json")
    with open(folder / "shard-000002.safetensors", "r+b") as f:
        f.truncate(100)
    generate_triplets(job(tiny_pipeline_dir, prompt_file, folder))
    assert folder_bytes(folder) == folder_bytes(reference)


def test_corrupted_and_truncated_shards_are_detected(reference, tiny_pipeline_dir, prompt_file, tmp_path):
    import shutil

    folder = shutil.copytree(reference, tmp_path / "bad")
    path = folder / "shard-000001.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the x1 rows
    path.write_bytes(bytes(data))
    dataset = TripletDataset(folder)
    dataset.read(np.array([0, 11]))  # other shards still read fine
    with pytest.raises(ShardError, match=r"fails its CRC32 check.*corrupted"):
        dataset.read(np.arange(5, 10))
    with pytest.raises(ShardError, match=r"sha256 differs.*corrupted"):
        TripletDataset(folder, verify="checksum")
    with open(folder / "shard-000002.safetensors", "r+b") as f:
        f.truncate(300)
    with pytest.raises(ShardError, match=r"shard-000002.safetensors.*truncated"):
        TripletDataset(folder)
    generate_triplets(job(tiny_pipeline_dir, prompt_file, folder))  # rebuilds both
    assert folder_bytes(folder) == folder_bytes(reference)


def test_resuming_with_a_different_config_is_refused(reference, tiny_pipeline_dir, prompt_file):
    with pytest.raises(ValueError, match=r"teacher\.guidance_scale: 3\.0 in the folder, 4\.0 now"):
        generate_triplets(job(tiny_pipeline_dir, prompt_file, reference, teacher_guidance_scale=4.0))


def test_unknown_config_keys_are_refused(tiny_pipeline_dir, prompt_file, tmp_path):
    config = job(tiny_pipeline_dir, prompt_file, tmp_path, shardsize=3)
    with pytest.raises(ValueError, match=r"unknown config keys \['shardsize'\]"):
        generate_triplets(config)


def test_loader_reads_each_sample_once_per_epoch_across_two_hosts(reference):
    dataset = TripletDataset(reference)
    hosts = [TripletLoader(dataset, global_batch=4, seed=3, process_index=p, process_count=2) for p in (0, 1)]
    assert hosts[0].steps_per_epoch == 3
    for epoch in range(2):
        seen = []
        for step in range(epoch * 3, epoch * 3 + 3):
            for loader in hosts:
                indices = loader.batch_indices(step)
                assert len(indices) == 2
                seen.extend(indices.tolist())
        assert sorted(seen) == list(range(12)), f"epoch {epoch}: {seen}"
    assert hosts[0].batch_indices(0).tolist() != hosts[0].batch_indices(3).tolist()  # reshuffled
    # Resuming at step 4 yields what an uninterrupted iteration yields at step 4.
    stream = hosts[1]()
    for _ in range(5):
        step, batch = next(stream)
    step_again, batch_again = next(hosts[1](start_step=4))
    assert step == step_again == 4
    for key in ("x0", "x1", "index"):
        np.testing.assert_array_equal(batch[key], batch_again[key])
    assert batch["prompt"] == batch_again["prompt"] == [PROMPTS[i] for i in batch["index"]]


def test_stored_and_regenerated_x0_give_identical_batches(
    reference, tiny_pipeline_dir, prompt_file, tmp_path
):
    generate_triplets(job(tiny_pipeline_dir, prompt_file, tmp_path / "x0", store_x0=True))
    stored, regenerated = TripletDataset(tmp_path / "x0"), TripletDataset(reference)
    assert "x0" in stored._reader(0).row_names and "x0" not in regenerated._reader(0).row_names
    for step in range(4):
        a = TripletLoader(stored, 4, seed=1).batch_indices(step)
        one, two = stored.read(a), regenerated.read(a)
        for key in ("x0", "x1", "index"):
            np.testing.assert_array_equal(one[key], two[key])


def test_command_line_with_the_tiny_config(tmp_path):
    config = os.path.join(ROOT, "configs", "triplets_sd15.py")
    base = [sys.executable, "-m", "instaflow_jax.generate_triplets", f"--config={config}:tiny"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = tmp_path / "cli"
    done = subprocess.run(
        base + [f"--config.output_dir={out}"], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(TripletDataset(out)) == 11  # 12 lines, one duplicate
    bad = subprocess.run(
        base + ["--config.teacher.stepz=3"], env=env, capture_output=True, text=True, timeout=600
    )
    assert bad.returncode != 0 and "stepz" in bad.stderr


@pytest.fixture()
def fake_gcs():
    """``gs://`` served from memory through fsspec, the backend epath uses for buckets."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class FakeGCS(MemoryFileSystem):
        protocol = ("gs", "gcs")
        root_marker = ""
        store: dict = {}  # noqa: RUF012 - fsspec's class-level storage
        pseudo_dirs: list = [""]  # noqa: RUF012

        def __init__(self, *args, finalize_on_close=None, **kwargs):
            super().__init__(*args, **kwargs)

        @classmethod
        def _strip_protocol(cls, path):
            for prefix in ("gs://", "gcs://"):
                path = path[len(prefix) :] if path.startswith(prefix) else path
            return path.rstrip("/")

    previous = {name: fsspec.registry.get(name) for name in ("gs", "gcs")}
    for name in ("gs", "gcs"):
        fsspec.register_implementation(name, FakeGCS, clobber=True)
    from etils.epath import backend

    backend.fsspec_backend._get_filesystem.cache_clear()
    yield
    FakeGCS.store.clear()
    for name, cls in previous.items():
        if cls is not None:
            fsspec.register_implementation(name, cls, clobber=True)
    backend.fsspec_backend._get_filesystem.cache_clear()


def test_bucket_paths_work_end_to_end(reference, tiny_pipeline_dir, fake_gcs):
    """Prompts read from, shards written to and batches read from gs:// equal the local run."""
    from etils import epath

    epath.Path("gs://bucket/prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    config = job(tiny_pipeline_dir, "gs://bucket/prompts.txt", "gs://bucket/triplets")
    generate_triplets(config)
    remote, local = TripletDataset("gs://bucket/triplets"), TripletDataset(reference)
    for name in ("shard-000000.safetensors", "shard-000002.safetensors"):
        assert (
            epath.Path(f"gs://bucket/triplets/{name}").read_bytes() == (Path(reference) / name).read_bytes()
        )
    indices = np.array([11, 0, 6])
    one, two = remote.read(indices), local.read(indices)
    for key in ("x0", "x1", "index"):
        np.testing.assert_array_equal(one[key], two[key])
