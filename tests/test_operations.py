"""Operating a run: TensorBoard events, honest timing, profiler traces, export of any checkpoint
step (and its hub upload), and triplet resume that does not re-read finished shards.

One tiny training run (4 steps) serves every training test; one tiny triplet dataset every
resume test."""

from __future__ import annotations

import contextlib
import functools
import glob
import gzip
import io
import json
import os
import re
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_checkpoints import _damage
from test_training import config, triplet_job

from instaflow_jax.generate_triplets import TripletJob, generate_triplets, pending_shards

SLOW_S = 1.5  # added to every sample grid and every checkpoint save of the run below


@pytest.fixture(scope="module")
def run(tiny_pipeline_dir, triplets, tmp_path_factory):
    """4 steps, logged at 2 and 4, checkpoints at 2 and 4, samples at 3 and 4, step 1 traced.

    Sampling and checkpointing are made ``SLOW_S`` slower, so a step time that counted them
    would show it. Returns (workdir, result, captured stderr)."""
    import instaflow_jax.train.trainer as trainer
    from instaflow_jax.train.checkpoint import Checkpointer
    from instaflow_jax.train.trainer import train_and_evaluate

    workdir = tmp_path_factory.mktemp("run")
    cfg = config(
        tiny_pipeline_dir,
        data={"path": triplets},
        num_steps=4,
        log_every=2,
        checkpoint_every=2,
        sample={"every": 3, "prompts": ["a photo of a cat", "a big blue square"]},
        profile={"start_step": 1, "num_steps": 1},
    )
    make_grid, save = trainer.make_grid, Checkpointer.save

    def slow_grid(*args, **kwargs):
        time.sleep(SLOW_S)
        return make_grid(*args, **kwargs)

    def slow_save(self, *args, **kwargs):
        started = save(self, *args, **kwargs)
        if started:
            time.sleep(SLOW_S)
        return started

    err = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(err):
        patch.setattr(trainer, "make_grid", slow_grid)
        patch.setattr(Checkpointer, "save", slow_save)
        result = train_and_evaluate(cfg, str(workdir))
    return workdir, result, err.getvalue()


def metrics(workdir: Path) -> dict[int, dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {record["step"]: record for record in map(json.loads, lines)}


# ------------------------------------------------------------------------- TensorBoard


def read_events(logdir: Path) -> list:
    """Every Event of the TFRecord files in ``logdir`` (framing: u64 length, u32 crc, data, u32 crc),
    decoded with the protobuf classes tensorboardX ships, independently of its writer."""
    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[pos + 12 : pos + 12 + length])
            events.append(event)
            pos += 12 + length + 4
        assert pos == len(data), f"{path}: trailing bytes"
    return events


def test_tensorboard_holds_scalars_sample_grids_and_hyperparameters(run):
    from tensorboardX.proto import plugin_hparams_pb2

    workdir, _, _ = run
    events = read_events(workdir / "tensorboard")
    scalars, images, plugins = {}, {}, {}
    for event in events:
        for value in event.summary.value:
            if value.HasField("simple_value"):
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
            elif value.HasField("image"):
                images[event.step] = value.image
            else:
                plugins[value.tag] = value
    expected = {"loss", "lr", "grad_norm"}
    assert {f"train/{k}" for k in expected} <= set(scalars), sorted(scalars)
    perf = {"step_time", "images_per_s", "compile_s", "sample_s", "checkpoint_s", "tflops"}
    assert {f"perf/{k}" for k in perf} <= set(scalars), sorted(scalars)
    assert "perf/mfu" not in scalars  # no peak FLOP/s known for a CPU: omitted, not invented
    logged = metrics(workdir)
    assert sorted(scalars["train/loss"]) == [2, 4]
    for step in (2, 4):
        for name in ("loss", "lr", "grad_norm"):
            np.testing.assert_allclose(scalars[f"train/{name}"][step], logged[step][name], rtol=1e-6)
        assert scalars["perf/step_time"][step] == pytest.approx(logged[step]["step_time"], rel=1e-6)
    # the sample grids, as the PNGs the run writes
    assert sorted(images) == [3, 4]
    for step, image in images.items():
        decoded = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)))
        png = np.asarray(Image.open(workdir / "samples" / f"step_{step:07d}.png"))
        np.testing.assert_array_equal(decoded, png)
    # hyper-parameters: the flattened config, in the HParams plugin's session start
    start = plugin_hparams_pb2.HParamsPluginData.FromString(
        plugins["_hparams_/session_start_info"].metadata.plugin_data.content
    ).session_start_info
    assert start.hparams["optimizer.learning_rate"].number_value == pytest.approx(2e-3)
    assert start.hparams["objective"].string_value == "reflow"
    assert start.hparams["batch_size"].number_value == 8
    assert "_hparams_/experiment" in plugins


def test_mfu_uses_the_chips_peak_and_is_omitted_where_unknown():
    from instaflow_jax.train.tensorboard import peak_flops, utilization

    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("TPU v5 lite") == 197e12
    assert peak_flops("TPU v5") == 459e12 and peak_flops("cpu") is None
    assert utilization(989e12 * 0.5, 1.0, 989e12) == {"tflops": 494.5, "mfu": 0.5}
    assert utilization(2e12, 0.5, None) == {"tflops": 4.0} and utilization(None, 0.5, 1e12) == {}


def test_step_time_excludes_sampling_checkpoints_and_compiling(run):
    workdir, _, stderr = run
    logged = metrics(workdir)
    # Steps 3 and 4 follow the slowed checkpoint of step 2 and the slowed grid of step 3: counted,
    # they would make step_time ≥ SLOW_S; step 2's interval holds the traced step.
    assert logged[4]["step_time"] < 0.75 * SLOW_S, logged[4]
    for step in (2, 4):
        assert logged[step]["images_per_s"] == pytest.approx(8 / logged[step]["step_time"])
        assert logged[step]["checkpoint_s"] >= SLOW_S
        assert logged[step]["compile_s"] > 0
    assert "sample_s" not in logged[2] and logged[4]["sample_s"] >= 2 * SLOW_S
    assert logged[4]["tflops"] > 0 and "mfu" not in logged[4]
    # one line per start-up phase, each with its duration
    for phase in ("loading models from", "compiling train step", "compiling sampler"):
        assert re.search(rf"^{phase}.*… \d+\.\d s$", stderr, flags=re.M), stderr


def test_the_profile_option_writes_a_trace(run):
    workdir, _, _ = run
    traces = glob.glob(str(workdir / "tensorboard" / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0, traces
    perfetto = glob.glob(str(workdir / "tensorboard" / "plugins" / "profile" / "*" / "*.trace.json.gz"))
    assert perfetto, os.listdir(os.path.dirname(traces[0]))
    with gzip.open(perfetto[0]) as f:
        assert json.load(f)["traceEvents"]


def test_the_generation_benchmark_writes_a_trace_with_profile_dir(tmp_path):
    """``bench_generate.py --profile-dir``'s trace helper, on a stand-in for the compiled generate
    (the benchmark's own models are SD-sized: GPU work)."""
    import importlib.util

    import jax

    spec = importlib.util.spec_from_file_location(
        "bench_generate", Path(__file__).parents[1] / "benchmarks/bench_generate.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    calls = []
    full = jax.jit(lambda params, ids, uncond, z0, g: z0 * params["scale"] + g)
    ids, z0 = np.zeros((3, 77), np.int32), np.ones((3, 8, 8, 4), np.float32)
    bench.trace_generation(lambda *a: calls.append(1) or full(*a), {"scale": 2.0}, ids, z0, 2, str(tmp_path))
    assert len(calls) == 2
    (trace,) = glob.glob(str(tmp_path / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert b"generate_batch_3" in Path(trace).read_bytes()  # the annotated generations
    assert glob.glob(str(tmp_path / "plugins" / "profile" / "*" / "*.trace.json.gz"))


# ------------------------------------------------------------------------- export


@functools.cache
def saved_state(workdir: Path, step: int) -> dict:
    """The train state of a checkpoint step as saved, read by orbax alone (no instaflow code)."""
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(workdir / "checkpoints") as manager:
        return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]


def saved_params(workdir: Path, step: int, which: str) -> dict:
    """``params`` or ``ema_params`` of a checkpoint step (see ``saved_state``)."""
    return saved_state(workdir, step)[which]


def torch_state(folder: Path) -> dict[str, np.ndarray]:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"))
    return {k: v.detach().numpy() for k, v in unet.state_dict().items()}


def unet_weights(saved: dict) -> dict[str, np.ndarray]:
    """PyTorch-named float32 UNet weights of a saved Flax param tree."""
    from instaflow_jax.weights.convert import flatten, flax_to_torch

    return {k: np.asarray(v, np.float32) for k, v in flax_to_torch(flatten(saved), "unet").items()}


def test_export_of_a_middle_step_loads_in_pytorch_diffusers(run, tmp_path):
    from instaflow_jax.cli.export import main

    workdir, _, _ = run
    out = tmp_path / "step2"
    assert main(["--workdir", str(workdir), "--step", "2", "--out", str(out)]) == 0
    ours = torch_state(out)
    expected = unet_weights(saved_params(workdir, 2, "params"))
    assert set(ours) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)
    final = unet_weights(saved_params(workdir, 4, "params"))
    assert any(not np.array_equal(final[k], expected[k]) for k in expected)  # really a middle step


def test_export_of_a_missing_or_damaged_step_is_one_error_line(run, tmp_path, capfd):
    from instaflow_jax.cli.export import main

    workdir, _, _ = run
    copy = tmp_path / "run"
    shutil.copytree(workdir / "checkpoints", copy / "checkpoints")
    _damage(copy / "checkpoints" / "2", "flip")
    capfd.readouterr()
    for step, problem in ((3, "has no checkpoint of step 3"), (2, "step 2 .* is damaged")):
        assert main(["--workdir", str(copy), "--step", str(step), "--out", str(tmp_path / "out")]) == 2
        err = capfd.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: "), err
        assert re.search(problem, err) and "saved steps: 2, 4" in err, err
    assert main(["--workdir", str(tmp_path / "nowhere"), "--step", "2", "--out", str(tmp_path / "o")]) == 2
    assert "is not a training run folder" in capfd.readouterr().err


def test_ema_export_and_push_to_hub_with_the_upload_faked(run, tmp_path, monkeypatch, capfd):
    import huggingface_hub
    from safetensors.numpy import load_file

    from instaflow_jax.cli.export import main, push_to_hub

    workdir, _, _ = run
    calls = []
    monkeypatch.setattr(
        huggingface_hub.HfApi,
        "create_repo",
        lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)) or f"https://hf.co/{repo_id}",
    )
    monkeypatch.setattr(
        huggingface_hub.HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw))
    )
    out = tmp_path / "out"
    argv = ["--workdir", str(workdir), "--step", "4", "--ema", "--out", str(out)]
    assert main(argv + ["--push-to-hub", "me/instaflow", "--private"]) == 0
    exported = load_file(next((out / "unet").glob("*.safetensors")))
    ema, raw = (
        unet_weights(saved_params(workdir, 4, "ema_params")),
        unet_weights(saved_params(workdir, 4, "params")),
    )
    for name, value in ema.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    assert any(not np.array_equal(ema[k], raw[k]) for k in ema)  # the EMA, not the raw weights
    assert calls[0] == ("create", "me/instaflow", {"repo_type": "model", "private": True, "exist_ok": True})
    upload = calls[1][1]
    assert upload["folder_path"] == str(out) and upload["repo_id"] == "me/instaflow"
    assert (out / "model_index.json").is_file() and "step 4" in upload["commit_message"]
    assert "pushed to https://hf.co/me/instaflow" in capfd.readouterr().out

    def offline(self, **kw):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", offline)
    with pytest.raises(ValueError, match=r"uploading .* to me/instaflow failed \(OSError: no network\)"):
        push_to_hub(str(out), "me/instaflow", False, "again")


# ------------------------------------------------------------------------- triplet resume


@pytest.fixture(scope="module")
def dataset(tiny_pipeline_dir, tmp_path_factory):
    """8 triplets in two shards (the teacher program of test_training's, so compiled once), the
    job config, and the job's stderr."""
    folder = tmp_path_factory.mktemp("triplets")
    job = triplet_job(tiny_pipeline_dir, folder)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        generate_triplets(job)
    return folder / "data", job, err.getvalue()


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*"))}


def test_triplet_rate_starts_after_compiling(dataset):
    _, _, stderr = dataset
    compiled = re.search(r"^compiling the teacher.*… \d+\.\d s$", stderr, flags=re.M)
    assert compiled and re.search(r"^loading teacher .*… \d+\.\d s$", stderr, flags=re.M), stderr
    assert compiled.start() < stderr.index("triplets (process"), stderr  # the bar starts after


def test_resume_checks_sizes_without_rehashing_and_rebuilds_a_truncated_shard(dataset, tmp_path, monkeypatch):
    import instaflow_jax.generate_triplets as job_module

    folder, job, _ = dataset
    copy = shutil.copytree(folder, tmp_path / "data")
    reference = shard_bytes(folder)

    def no_rehash(*args):
        raise AssertionError("a finished shard was re-read and hashed")

    monkeypatch.setattr(job_module, "verify_shard", no_rehash)
    assert pending_shards(copy, [0, 1]) == []  # size (the default): nothing read, nothing rebuilt
    with open(copy / "shard-000001.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(copy / "shard-000001.safetensors") - 16)
    assert pending_shards(copy, [0, 1], "size") == [1]
    generate_triplets({**job, "output_dir": str(copy)})
    assert shard_bytes(copy) == reference


def test_full_verification_rehashes_with_progress_and_catches_a_flipped_byte(dataset, tmp_path, capfd):
    folder, job, _ = dataset
    copy = shutil.copytree(folder, tmp_path / "data")
    path = copy / "shard-000000.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert pending_shards(copy, [0, 1], "size") == []  # same size: only a full check sees it
    capfd.readouterr()
    generate_triplets({**job, "output_dir": str(copy), "verify": "full"})
    assert shard_bytes(copy) == shard_bytes(folder)
    assert re.search(r"verifying finished shards \(full\).*2/2", capfd.readouterr().err)
    with pytest.raises(ValueError, match=r"verify 'sha'; expected one of \('size', 'full'\)"):
        TripletJob.from_config({**job, "verify": "sha"})
