"""Triplet generation and reading: determinism, resume after a kill, corruption, sharded reading."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import instaflow_jax
from instaflow_jax.data.loader import ShuffledLoader
from instaflow_jax.data.shards import NonFiniteError, ShardError
from instaflow_jax.data.triplets import ManifestError, TripletDataset, list_complete_shards
from instaflow_jax.files import FolderNotWritableError, UnsafePathError
from instaflow_jax.generate_triplets import (
    NonFiniteTeacherError,
    TeacherConfig,
    check_finite,
    generate_triplets,
)
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
        from instaflow_jax import files
        from instaflow_jax.generate_triplets import generate_triplets
        real_write, calls = files.write_bytes_atomic, []
        def write(path, data):
            if str(path).endswith(".safetensors"):
                calls.append(path)
            if len(calls) == 2:  # half of shard 1 on disk under its temporary name, then die
                files.temporary_path(path).write_bytes(data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            real_write(path, data)
        files.write_bytes_atomic = write
        generate_triplets({config!r})
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=600
    )
    assert result.returncode == -9  # really killed
    left = sorted(os.listdir(tmp_path / "killed"))
    assert "shard-000000.json" in left and "shard-000001.json" not in left
    assert any(re.fullmatch(r"shard-000001\.safetensors\.\d+\.[0-9a-f]{12}\.tmp", n) for n in left), left
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
    generate_triplets(job(tiny_pipeline_dir, prompt_file, folder, verify="full"))  # rebuilds both
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
    hosts = [
        ShuffledLoader(dataset, global_batch=4, seed=3, process_index=p, process_count=2) for p in (0, 1)
    ]
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
        a = ShuffledLoader(stored, 4, seed=1).batch_indices(step)
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


# ------------------------------------------ integrity: checksums, contained paths, NaN, races


def canonical_sha256(data: dict) -> str:
    """The documented sidecar/manifest checksum, computed independently of the package."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def rewrite_json(path, edit) -> None:
    """Apply ``edit`` to a sidecar or manifest and re-sign it, as a careful forger would."""
    data = json.loads(Path(path).read_text())
    data.pop("json_sha256", None)
    edit(data)
    data["json_sha256"] = canonical_sha256(data)
    Path(path).write_text(json.dumps(data))


@pytest.fixture()
def damaged(reference, tmp_path):
    """A private copy of the reference dataset that a test may damage."""
    return Path(shutil.copytree(reference, tmp_path / "damaged"))


def test_sidecars_and_manifest_carry_their_own_checksum(reference):
    names = ["manifest.json", "shard-000000.json", "shard-000001.json", "shard-000002.json"]
    for name in names:
        data = json.loads((Path(reference) / name).read_text())
        assert data.pop("json_sha256") == canonical_sha256(data), name
    assert json.loads((Path(reference) / "manifest.json").read_text())["version"] == 2


def test_edited_prompt_or_manifest_is_caught_and_the_sidecar_rebuilt(
    damaged, reference, tiny_pipeline_dir, prompt_file
):
    sidecar = damaged / "shard-000001.json"
    text = sidecar.read_text()
    assert text.count('"a photo of a cat"') == 1
    sidecar.write_text(text.replace('"a photo of a cat"', '"a photo of a dog"'))
    for verify in ("checksum", "size"):
        with pytest.raises(ShardError, match=r"shard-000001\.json: its contents do not match its checksum"):
            TripletDataset(damaged, verify=verify)
    manifest = damaged / "manifest.json"
    original = manifest.read_text()
    manifest.write_text(original.replace('"seed": 5', '"seed": 6'))
    with pytest.raises(ManifestError, match=r"manifest\.json: its contents do not match its checksum"):
        TripletDataset(damaged)
    manifest.write_text(original)
    generate_triplets(job(tiny_pipeline_dir, prompt_file, damaged))  # the damaged sidecar is rebuilt
    assert folder_bytes(damaged) == folder_bytes(reference)


def test_broken_json_names_the_file_and_what_to_do(damaged):
    manifest = damaged / "manifest.json"
    manifest.write_text(manifest.read_text()[:11])
    with pytest.raises(
        ManifestError,
        match=r"manifest\.json is not valid JSON \(.*: line \d+, column \d+ of 11 bytes\).*Restore it",
    ):
        TripletDataset(damaged)
    manifest.write_text("")
    with pytest.raises(ManifestError, match=r"manifest\.json is empty"):
        TripletDataset(damaged)
    (damaged / "shard-000002.json").write_text('{"shard": 2, "file": ')
    with pytest.raises(ShardError, match=r"shard-000002\.json is not valid JSON.*re-run the generator"):
        list_complete_shards(damaged)


def test_a_sidecar_must_describe_its_own_shard_inside_its_folder(damaged, reference, tmp_path):
    """The probes: a sidecar lending its prompts to another shard's rows, or reading outside."""
    sidecar = damaged / "shard-000001.json"
    original = sidecar.read_text()
    for name in ("shard-000000.safetensors", "../../x.safetensors", "/etc/passwd"):
        rewrite_json(sidecar, lambda data, name=name: data.update(file=name))
        with pytest.raises(ShardError, match=r"must name its own shard file shard-000001\.safetensors"):
            TripletDataset(damaged, verify="checksum")
    sidecar.write_text((damaged / "shard-000000.json").read_text())
    with pytest.raises(ShardError, match=r"shard-000001\.json describes shard 0"):
        TripletDataset(damaged)

    # Shard 0's file under shard 1's name, its sidecar re-signed to match: the rows' indices differ.
    sidecar.write_text(original)
    shard_file = damaged / "shard-000001.safetensors"
    shard_file.write_bytes((damaged / "shard-000000.safetensors").read_bytes())
    data = shard_file.read_bytes()
    rewrite_json(sidecar, lambda d: d.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest()))
    expected = r"holds samples \[0, 1, 2, 3\]…, its sidecar lists \[5, 6, 7, 8\]…"
    with pytest.raises(ShardError, match=expected):
        TripletDataset(damaged, verify="checksum")
    with pytest.raises(ShardError, match=expected):
        TripletDataset(damaged).read(np.array([6]))

    # A shard file that is a symbolic link out of the dataset folder.
    shutil.copy(Path(reference) / "shard-000001.safetensors", tmp_path / "out")
    sidecar.write_text(original)
    shard_file.unlink()
    shard_file.symlink_to(tmp_path / "out")
    with pytest.raises(UnsafePathError, match=r"symbolic link to .*out, outside"):
        TripletDataset(damaged)


def test_nan_rows_are_refused_by_the_writer_and_caught_by_every_reader(tmp_path, monkeypatch):
    from instaflow_jax.data import shards

    x1 = np.ones((3, 2, 2, 4), np.float16)
    x1[1, 0, 1, 2] = np.nan
    args = (tmp_path, 0, {"x1": x1}, np.array([10, 11, 12]), ["a", "b", "c"])
    with pytest.raises(NonFiniteError, match=r"refusing to write 1 of 3 rows .*samples \[11\]"):
        shards.write_shard(*args)
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(shards, "nonfinite_rows", lambda arrays: np.zeros(0, np.int64))
    shards.write_shard(*args)  # someone else's writer, without the check
    monkeypatch.undo()
    sidecar = shards.read_sidecar(tmp_path / "shard-000000.json")
    with pytest.raises(NonFiniteError, match=r"1 of 3 rows hold NaN or inf \(samples \[11\]\)"):
        shards.verify_shard(tmp_path, sidecar)
    reader = shards.ShardReader(tmp_path, sidecar)
    np.testing.assert_array_equal(reader.read_rows(np.array([2, 0]))["x1"], x1[[2, 0]])
    with pytest.raises(NonFiniteError, match=r"rows \[1\] \(samples \[11\]\) hold NaN or inf"):
        reader.read_rows(np.array([0, 1]))


def test_nan_teacher_stops_the_job_before_any_shard_is_written(tiny_pipeline_dir, prompt_file, tmp_path):
    from safetensors.numpy import load_file, save_file

    teacher = shutil.copytree(tiny_pipeline_dir, tmp_path / "nan_teacher")
    weights = teacher / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state["conv_out.bias"] = np.full_like(state["conv_out.bias"], np.nan)
    save_file(state, str(weights))
    out = tmp_path / "out"
    expected = (  # the pipeline's on-device check, given the dataset's shard and sample indices
        r"non-finite \(NaN/inf\) teacher output in the batch of samples 0–1 of shard-000000 \(batch "
        r"position i is dataset sample 0 \+ i\): .*'a small red circle'.*'a small blue circle'.*"
        r"Likely cause: the unet weights hold NaN/inf.*Nothing of this shard was written"
    )
    with pytest.raises(NonFiniteTeacherError, match=expected):
        generate_triplets(job(str(teacher), prompt_file, out))
    assert [n for n in os.listdir(out) if n.startswith("shard-")] == []


def test_a_float16_overflow_is_named_as_the_cause():
    x1 = np.zeros((3, 2, 2, 4), np.float32)
    x1[1] = 1e5  # finite in float32, inf in float16
    with np.errstate(over="ignore"):
        stored = x1.astype(np.float16)
    with pytest.raises(NonFiniteTeacherError, match=r"sample indices \[8\].*overflow latent_dtype=float16"):
        check_finite(x1, stored, np.array([7, 8, 9]), 1, PROMPTS, TeacherConfig())
    check_finite(x1, x1, np.array([7, 8, 9]), 1, PROMPTS, TeacherConfig())  # float32: fine


def test_two_processes_writing_the_same_shard_never_collide(tmp_path):
    """The race probe: 2 × 150 writes of one shard at once; no crash, no sidecar of 0 bytes."""
    script = textwrap.dedent(
        """
        import sys, time
        from pathlib import Path
        import numpy as np
        from instaflow_jax.data.shards import read_sidecar, write_shard
        folder, me = Path(sys.argv[1]), sys.argv[2]
        x1 = np.random.default_rng(0).standard_normal((4, 8, 8, 4)).astype(np.float16)
        (folder / f"ready-{me}").touch()
        while len(list(folder.glob("ready-*"))) < 2:  # start together
            time.sleep(0.005)
        for _ in range(150):
            write_shard(folder, 3, {"x1": x1}, np.arange(12, 16), ["a", "b", "c", "d"])
            sidecar = read_sidecar(folder / "shard-000003.json")
            size = (folder / "shard-000003.safetensors").stat().st_size
            assert sidecar["bytes"] == size > 0, (sidecar["bytes"], size)
        """
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path), str(i)], env=env, stderr=subprocess.PIPE
        )
        for i in range(2)
    ]
    errors = [writer.communicate(timeout=300)[1].decode()[-1500:] for writer in writers]
    assert [w.returncode for w in writers] == [0, 0], errors
    from instaflow_jax.data.shards import read_sidecar, verify_shard

    verify_shard(tmp_path, read_sidecar(tmp_path / "shard-000003.json"))
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_unwritable_output_folder_is_refused_before_any_work(prompt_file, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    config = job("/nonexistent/teacher", prompt_file, blocker / "triplets")  # never loaded
    with pytest.raises(FolderNotWritableError, match=r"output_dir .*a_file/triplets cannot be written"):
        generate_triplets(config)
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        (tmp_path / "ro").mkdir(mode=0o555)
        with pytest.raises(FolderNotWritableError, match=r"PermissionError"):
            generate_triplets(job("/nonexistent/teacher", prompt_file, tmp_path / "ro"))
    cli = [sys.executable, "-m", "instaflow_jax.generate_triplets"]
    cli += [f"--config={ROOT}/configs/triplets_sd15.py:tiny", f"--config.output_dir={blocker}/triplets"]
    done = subprocess.run(
        cli + ["--config.teacher.model=/nonexistent/teacher"],
        env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "output_dir" in errors[0] and "cannot be written" in errors[0], errors


def test_datasets_of_format_v1_still_read_but_are_not_extended(
    damaged, reference, tiny_pipeline_dir, prompt_file, caplog
):
    """Written before checksummed JSON: read (shard files verified) with a warning; never mixed."""
    for path in damaged.glob("*.json"):
        data = json.loads(path.read_text())
        data.pop("json_sha256")
        if path.name == "manifest.json":
            data["version"] = 1
        path.write_text(json.dumps(data, indent=1))
    with caplog.at_level("WARNING"):
        old = TripletDataset(damaged, verify="checksum")
    assert "older instaflow-jax (format v1)" in caplog.text
    indices = np.array([11, 0, 6])
    one, two = old.read(indices), TripletDataset(reference).read(indices)
    for key in ("x0", "x1", "index"):
        np.testing.assert_array_equal(one[key], two[key])
    assert one["prompt"] == two["prompt"]
    with pytest.raises(ValueError, match=r"format v1, written by an older instaflow-jax.*new output_dir"):
        generate_triplets(job(tiny_pipeline_dir, prompt_file, damaged))


def test_stale_temporary_files_of_killed_writers_are_removed(damaged):
    """Unique temporary names are never reused, so a resume deletes those of dead writers (old),
    never a live writer's (fresh)."""
    from instaflow_jax.generate_triplets import pending_shards

    os.remove(damaged / "shard-000002.json")
    stale, fresh = (
        damaged / "shard-000002.safetensors.11.aaaaaaaaaaaa.tmp",
        damaged / "shard-000002.json.12.b.tmp",
    )
    for path in (stale, fresh):
        path.write_bytes(b"partial")
    os.utime(stale, (0, os.path.getmtime(stale) - 7200))
    assert pending_shards(damaged, [0, 2]) == [2]
    assert not stale.exists() and fresh.exists()
