"""``instaflow-eval`` end to end on a COCO-format fixture: the 5k protocol's steps on 6 images with
random FID Inception and tiny CLIP weights; FID against pytorch-fid's arithmetic on the written
features, resume after a kill, 1 vs 4 devices, and 1 vs 2 processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pytorch_fid")

from test_clip_model import write_tiny_clip_model  # noqa: E402
from test_evaluation_metrics import import_fid_score, write_coco  # noqa: E402
from test_inception import import_pytorch_fid, random_state_dict  # noqa: E402

from instaflow_jax.cli import evaluate as eval_cli  # noqa: E402
from instaflow_jax.evaluation import feature_shards  # noqa: E402
from instaflow_jax.evaluation.fid import GaussianStats  # noqa: E402
from instaflow_jax.evaluation.job import EvalSettings, evaluate  # noqa: E402

NUM_IMAGES, BATCH = 6, 4


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_pipeline_dir):
    """(COCO folder, FID Inception .pth with random weights, tiny CLIP folder, stats cache)."""
    root = tmp_path_factory.mktemp("eval_inputs")
    coco = write_coco(str(root / "coco"), count=8)
    inception = str(root / "pt_inception-random.pth")
    torch.save(random_state_dict(import_pytorch_fid()), inception)
    clip = str(root / "clip")
    write_tiny_clip_model(clip, "quick_gelu", legacy_eos=False, seed=0)
    return {"coco": coco, "inception": inception, "clip": clip, "stats_cache": str(root / "stats")}


def settings(inputs, model: str, out: str) -> EvalSettings:
    return EvalSettings(
        model=model,
        out=out,
        protocol="coco2017-5k",
        num_images=NUM_IMAGES,
        batch=BATCH,
        dtype="float32",
        **inputs,
    )


def cli_args(model: str, out: str, inputs: dict[str, str], **overrides: str) -> list[str]:
    """``instaflow-eval`` arguments of the 5k protocol on the fixture (``inputs``' files, sizes of
    this module); ``overrides`` replace or add flags (``stats_cache="…"`` → ``--stats-cache …``)."""
    flags = {"model": model, "num_images": str(NUM_IMAGES), "batch": str(BATCH), "dtype": "float32"}
    flags.update(out=out, **inputs)
    flags.update(overrides)
    return [arg for name, value in flags.items() for arg in ("--" + name.replace("_", "-"), value)]


@pytest.fixture(scope="module")
def full_run(inputs, tiny_pipeline_dir, tmp_path_factory):
    """The CLI run once, uninterrupted: (out folder, results)."""
    out = str(tmp_path_factory.mktemp("eval") / "full")
    argv = cli_args(tiny_pipeline_dir, out, inputs, protocol="coco2017-5k") + ["--save-images"]
    assert eval_cli.main(argv) == 0
    with open(os.path.join(out, "results.json")) as f:
        return out, json.load(f)


def read_features(out: str) -> dict[str, np.ndarray]:
    parts = [np.load(os.path.join(out, "features", f"batch-{b:06d}.npz")) for b in range(2)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0].files}


def results_equal_the_full_runs(out: str, full_run) -> dict:
    """Assert that ``out``'s features (atol 1e-5), FID and CLIP score equal the one-device,
    one-process run's; returns ``out``'s results."""
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    ours, full = read_features(out), read_features(full_run[0])
    for key in ("pool", "clip_cos"):
        np.testing.assert_allclose(ours[key], full[key], rtol=0, atol=1e-5, err_msg=key)
    assert results["fid"] == pytest.approx(full_run[1]["fid"], rel=1e-4)
    assert results["clip_score"] == pytest.approx(full_run[1]["clip_score"], rel=1e-5)
    return results


def test_protocol_end_to_end(full_run, inputs):
    out, results = full_run
    assert results["num_images"] == NUM_IMAGES and not results["paper_protocol"]
    assert results["settings"]["steps"] == 1 and results["settings"]["guidance"] == 0.0
    for name in ("results.md", "grid.png", "prompts.json", *(f"images/{i:06d}.png" for i in range(6))):
        assert os.path.isfile(os.path.join(out, name)), name
    with open(os.path.join(out, "prompts.json")) as f:
        drawn = json.load(f)
    assert drawn["digest"] == results["prompts_digest"] and len(drawn["samples"]) == NUM_IMAGES
    features = read_features(out)
    assert features["pool"].shape == (NUM_IMAGES, 2048) and features["clip_cos"].shape == (NUM_IMAGES,)
    # FID: pytorch-fid's Fréchet distance of the written features and the cached reference statistics.
    (cached,) = [n for n in os.listdir(inputs["stats_cache"]) if n.endswith(".npz")]
    reference = GaussianStats.load(os.path.join(inputs["stats_cache"], cached))
    mu, sigma = features["pool"].mean(0), np.cov(features["pool"], rowvar=False)
    expected = import_fid_score().calculate_frechet_distance(mu, sigma, reference.mu, reference.sigma)
    assert results["fid"] > 0 and abs(results["fid"] - expected) <= 1e-4 * expected
    assert results["clip_score"] == pytest.approx(float(np.mean(features["clip_cos"].astype(np.float64))))
    assert -1 <= results["clip_score"] <= 1 and results["images_per_s"] > 0
    with open(os.path.join(out, "results.md")) as f:
        report = f.read()
    assert "InstaFlow-0.9B, 1 step | 23.40 | 0.304" in report and "not comparable" in report


def test_reference_statistics_are_pytorch_fids_features(full_run, inputs):
    """The cached reference μ equals pytorch-fid's InceptionV3 on the same drawn, resized images."""
    from unittest import mock

    from instaflow_jax.evaluation.coco import PROTOCOLS, draw_samples, load_reference_image

    pfi = import_pytorch_fid()
    state = torch.load(inputs["inception"], weights_only=True)
    with mock.patch.object(pfi, "load_state_dict_from_url", lambda *args, **kwargs: state):
        model = pfi.InceptionV3([3], resize_input=True, normalize_input=True).eval()
    samples = draw_samples(inputs["coco"], PROTOCOLS["coco2017-5k"], 0, NUM_IMAGES)
    images = np.stack([load_reference_image(s.path, 512) for s in samples])
    with torch.no_grad():
        ref = model(torch.from_numpy(images).permute(0, 3, 1, 2))[0][:, :, 0, 0].double().numpy()
    (cached,) = [n for n in os.listdir(inputs["stats_cache"]) if n.endswith(".npz")]
    ours = GaussianStats.load(os.path.join(inputs["stats_cache"], cached))
    np.testing.assert_allclose(ours.mu, ref.mean(0), atol=1e-4)
    np.testing.assert_allclose(ours.sigma, np.cov(ref, rowvar=False), atol=1e-4)


def test_killed_run_resumes_with_identical_results(
    full_run, inputs, tiny_pipeline_dir, tmp_path, monkeypatch
):
    out = str(tmp_path / "resumed")
    write = feature_shards.FeatureShards.write

    def write_then_die(self, batch, arrays):
        write(self, batch, arrays)
        if "clip_cos" in arrays:  # a generation batch (not the reference's)
            raise KeyboardInterrupt

    monkeypatch.setattr(feature_shards.FeatureShards, "write", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        evaluate(settings(inputs, tiny_pipeline_dir, out))
    assert sorted(os.listdir(os.path.join(out, "features"))) == [
        "batch-000000.npz",
        "grid-000000.npy",
        "manifest.json",
    ]
    monkeypatch.setattr(feature_shards.FeatureShards, "write", write)
    resumed = evaluate(settings(inputs, tiny_pipeline_dir, out))
    full = full_run[1]
    for key in ("fid", "clip_score", "clip_score_torchmetrics", "prompts_digest"):
        assert resumed[key] == full[key], key
    for key, value in read_features(full_run[0]).items():
        np.testing.assert_array_equal(read_features(out)[key], value)


def test_four_devices_give_the_same_features(full_run, inputs, tiny_pipeline_dir, tmp_path):
    out = str(tmp_path / "four")
    code = (
        "import sys; from instaflow_jax.cli.evaluate import main; import jax; "
        "assert jax.device_count() == 4, jax.devices(); sys.exit(main(sys.argv[1:]))"
    )
    argv = cli_args(tiny_pipeline_dir, out, inputs)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert results_equal_the_full_runs(out, full_run)["devices"] == 4


def test_two_processes_give_the_same_results(full_run, inputs, tiny_pipeline_dir, tmp_path):
    """``instaflow-eval --coordinator-address … --num-processes 2 --process-id I`` on localhost
    (gloo): the two processes share one output folder, each takes its round-robin batches of the
    reference statistics (a fresh cache) and of the samples, and process 0 waits for the other at
    the barriers and writes the results. Features and scores equal one process's."""
    from test_training import _free_port

    out = str(tmp_path / "two")
    argv = cli_args(tiny_pipeline_dir, out, inputs, stats_cache=str(tmp_path / "stats"))
    argv += ["--coordinator-address", f"127.0.0.1:{_free_port()}", "--num-processes", "2"]
    code = "import sys; from instaflow_jax.cli.evaluate import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, *argv, "--process-id", str(pid)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in (0, 1)
    ]
    logs = [proc.communicate(timeout=900)[0] for proc in procs]
    for pid, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"process {pid}:\n{log[-3000:]}"
    assert results_equal_the_full_runs(out, full_run)["processes"] == 2


def test_cli_errors_say_what_to_do(tiny_pipeline_dir, inputs, tmp_path, capsys):
    base = ["--model", tiny_pipeline_dir, "--out", str(tmp_path / "o")]
    assert eval_cli.main(base + ["--inception", inputs["inception"]]) == 2
    assert "give --coco PATH" in capsys.readouterr().err
    assert eval_cli.main(base + ["--coco", inputs["coco"]]) == 2
    assert "nothing to score" in capsys.readouterr().err
    assert eval_cli.main(base + ["--coco", inputs["coco"], "--inception", str(tmp_path / "no.pth")]) == 2
    assert "is not a file" in capsys.readouterr().err
    argv = base + ["--coco", inputs["coco"], "--inception", inputs["inception"]]
    assert eval_cli.main(argv) == 2  # 8 images in the folder, the protocol wants 5000
    assert "pass --num-images" in capsys.readouterr().err
    assert eval_cli.main(argv + ["--coordinator-address", "127.0.0.1:1234", "--num-processes", "2"]) == 2
    assert "--process-id I together" in capsys.readouterr().err


def test_custom_prompts_give_clip_score_and_images(inputs, tiny_pipeline_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n\na yellow star\n")
    out = str(tmp_path / "custom")
    argv = ["--model", tiny_pipeline_dir, "--prompts", str(prompts), "--clip", inputs["clip"], "--batch", "2"]
    assert eval_cli.main(argv + ["--dtype", "float32", "--save-images", "--out", out]) == 0
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    assert results["protocol"] == "prompts" and results["num_images"] == 3 and results["fid"] is None
    assert -1 <= results["clip_score"] <= 1
    assert sorted(os.listdir(os.path.join(out, "images"))) == [f"{i:06d}.png" for i in range(3)]
