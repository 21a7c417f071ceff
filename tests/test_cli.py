"""Command-line tools, latent interpolation, data parallelism and the compilation cache."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import instaflow_jax
from instaflow_jax.cli import generate as generate_cli
from instaflow_jax.cli import interpolate as interpolate_cli
from instaflow_jax.sampling.interpolation import slerp, slerp_path


def test_generate_cli_writes_a_grid_and_timings(tiny_pipeline_dir, tmp_path, capsys):
    grid = tmp_path / "grid.png"
    argv = [
        "--model",
        tiny_pipeline_dir,
        "--prompt",
        "a red circle",
        "--prompt",
        "a cat",
        "--num-images",
        "3",
    ]
    argv += ["--height", "64", "--width", "64", "--out", str(grid), "--out-dir", str(tmp_path / "each")]
    assert generate_cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "compile time:" in out and "ms/image" in out
    assert Image.open(grid).size == (3 * 66 - 2, 2 * 66 - 2)  # 3 columns, 2 rows, 2-pixel gaps
    assert sorted(os.listdir(tmp_path / "each")) == [f"{i:04d}.png" for i in range(6)]


def test_generate_cli_images_equal_the_library(tiny_pipeline_dir, tmp_path):
    argv = ["--model", tiny_pipeline_dir, "--prompt", "a cat", "--num-images", "2", "--steps", "2"]
    argv += ["--guidance", "1.5", "--seed", "4", "--height", "64", "--width", "64"]
    argv += ["--out", str(tmp_path / "g.png"), "--out-dir", str(tmp_path / "each")]
    assert generate_cli.main(argv) == 0
    pipe = instaflow_jax.load_pipeline(tiny_pipeline_dir)
    images = pipe.generate(["a cat"] * 2, num_steps=2, guidance_scale=1.5, seed=4, height=64, width=64)
    saved = np.asarray(Image.open(tmp_path / "each" / "0001.png"), np.float32) / 255.0
    np.testing.assert_allclose(saved, images[1], atol=1 / 255 + 1e-6)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "/no/such/folder"], "no such folder"),
        (["--height", "100"], "--height 100 is impossible.*multiples of 8"),
        (["--dtype", "bf17"], "unknown dtype name 'bf17'"),
        (["--num-images", "0"], "--num-images must be"),
        (["--seed", "4294967296"], "seed 4294967296 is out of range"),
        (["--seed", "-1"], "seed -1 is out of range"),
        (["--steps", "0"], "--steps must be ≥ 1"),
        (["--guidance", "inf"], "--guidance must be a finite number"),
        (["--out", "/proc/no/grid.png"], "the folder of --out /proc/no cannot be written"),
    ],
)
def test_generate_cli_bad_input_is_one_clear_error(tiny_pipeline_dir, capsys, extra, message):
    argv = ["--model", tiny_pipeline_dir, "--prompt", "x", "--height", "64", "--width", "64"] + extra
    assert generate_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert __import__("re").search(message, err), err


def test_generate_cli_folder_of_another_family(tiny_pipeline_dir, tmp_path, capsys):
    import json
    import shutil

    folder = shutil.copytree(tiny_pipeline_dir, tmp_path / "sdxl")
    index = json.loads((folder / "model_index.json").read_text())
    index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
    (folder / "model_index.json").write_text(json.dumps(index))
    assert generate_cli.main(["--model", str(folder), "--prompt", "x"]) == 2
    assert "SDXL" in capsys.readouterr().err


def test_slerp_closed_forms():
    a = jnp.array([[1.0, 0.0, 0.0]])
    b = jnp.array([[0.0, 1.0, 0.0]])
    np.testing.assert_allclose(slerp(a, b, 0.0), a, atol=1e-7)
    np.testing.assert_allclose(slerp(a, b, 1.0), b, atol=1e-7)
    mid = np.asarray(slerp(a, b, 0.5))
    np.testing.assert_allclose(mid, [[np.sqrt(0.5), np.sqrt(0.5), 0.0]], atol=1e-6)  # stays on the sphere
    np.testing.assert_allclose(slerp(a, 2 * a, 0.5), 1.5 * a, atol=1e-6)  # parallel: linear fallback
    path = slerp_path(a, b, 5)
    assert path.shape == (5, 1, 3)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(path), axis=-1), 1.0, atol=1e-6)


def test_interpolate_cli_writes_frames_and_a_gif(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "walk"
    argv = ["--model", tiny_pipeline_dir, "--prompt", "a red circle", "--seeds", "2", "9", "--frames", "4"]
    argv += ["--batch", "3", "--height", "64", "--width", "64", "--out-dir", str(out)]
    assert interpolate_cli.main(argv) == 0
    printed = capsys.readouterr()
    lines = printed.out.splitlines()
    assert str(out) in lines[0] and lines[-2].startswith("compile time: ") and "ms/image" in lines[-1]
    assert "frames: 100% 4/4" in printed.err and "\r" not in printed.err  # progress, as lines in a log
    assert sorted(os.listdir(out)) == [
        "frame_000.png",
        "frame_001.png",
        "frame_002.png",
        "frame_003.png",
        "interpolation.gif",
    ]
    assert Image.open(out / "interpolation.gif").n_frames == 4
    # The end frames are the plain generations of seeds 2 and 9.
    pipe = instaflow_jax.load_pipeline(tiny_pipeline_dir)
    for frame, seed in (("frame_000.png", 2), ("frame_003.png", 9)):
        expected = pipe.generate(["a red circle"], seed=seed, height=64, width=64)[0]
        saved = np.asarray(Image.open(out / frame), np.float32) / 255.0
        np.testing.assert_allclose(saved, expected, atol=1 / 255 + 1e-5)


def test_batches_are_split_over_four_devices_identically(tiny_pipeline_dir, tmp_path):
    """Four fake CPU devices and an odd batch (padded to 4) give the one-device result."""
    pipe = instaflow_jax.load_pipeline(tiny_pipeline_dir)
    prompts = ["a red circle", "a cat", "a horse"]
    reference = pipe.generate(prompts, num_steps=2, guidance_scale=2.0, seed=1, height=64, width=64)
    script = textwrap.dedent(
        f"""
        import numpy as np, jax, instaflow_jax
        assert jax.device_count() == 4, jax.devices()
        pipe = instaflow_jax.load_pipeline({tiny_pipeline_dir!r})
        assert pipe.mesh.shape["data"] == 4
        out = pipe.generate({prompts!r}, num_steps=2, guidance_scale=2.0, seed=1, height=64, width=64)
        np.save({str(tmp_path / "out.npy")!r}, out)
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=600)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), reference, atol=1e-5)


def test_generate_turns_on_the_persistent_compilation_cache(tiny_pipeline_dir):
    pipe = instaflow_jax.load_pipeline(tiny_pipeline_dir)
    pipe.generate(["a cat"], height=64, width=64)
    assert jax.config.jax_compilation_cache_dir == os.environ["INSTAFLOW_JAX_COMPILATION_CACHE"]


@pytest.mark.parametrize(
    "extra, kwargs",
    [
        (
            ["--steps", "4", "--guidance", "1.5", "--negative-prompt", "blurry"],
            {"num_steps": 4, "guidance_scale": 1.5, "negative_prompt": "blurry"},
        ),
        (
            ["--solver", "dpmpp2m", "--steps", "25", "--guidance", "5"],
            {"num_steps": 25, "guidance_scale": 5.0, "solver": "dpmpp2m"},
        ),
    ],
    ids=["2rf-few-steps-cfg-negative", "sd-teacher-dpmpp2m"],
)
def test_generate_cli_sampling_options_equal_the_library(tiny_pipeline_dir, tmp_path, extra, kwargs):
    """The README's 2-RF and SD-teacher commands, on the tiny pipeline."""
    argv = ["--model", tiny_pipeline_dir, "--prompt", "a cat in a hat", "--num-images", "1"]
    argv += [
        "--height",
        "64",
        "--width",
        "64",
        "--out",
        str(tmp_path / "g.png"),
        "--out-dir",
        str(tmp_path / "each"),
    ]
    assert generate_cli.main(argv + extra) == 0
    expected = instaflow_jax.load_pipeline(tiny_pipeline_dir).generate(
        ["a cat in a hat"], height=64, width=64, **kwargs
    )
    saved = np.asarray(Image.open(tmp_path / "each" / "0000.png"), np.float32) / 255.0
    np.testing.assert_allclose(saved, expected[0], atol=1 / 255 + 1e-5)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--batch", "0"], "--batch must be ≥ 1, got 0"),
        (["--batch", "-1"], "--batch must be ≥ 1, got -1"),
        (["--fps", "0"], "--fps must be ≥ 0.1, got 0.0"),
        (["--frames", "1"], "--frames must be ≥ 2"),
        (["--seeds", "0", "4294967296"], "seed 4294967296 is out of range"),
    ],
)
def test_interpolate_cli_bad_input_is_one_clear_error(tiny_pipeline_dir, tmp_path, capsys, extra, message):
    argv = ["--model", tiny_pipeline_dir, "--prompt", "x", "--out-dir", str(tmp_path / "walk")] + extra
    assert interpolate_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and message in err, err


def test_a_model_with_nan_weights_is_an_error_not_a_black_image(tiny_pipeline_dir, tmp_path, capsys):
    import shutil

    from safetensors.numpy import load_file, save_file

    folder = shutil.copytree(tiny_pipeline_dir, tmp_path / "nan")
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    bias = next(k for k in sorted(tensors) if k.startswith("decoder.") and k.endswith(".bias"))
    tensors[bias] = np.full_like(tensors[bias], np.nan)
    save_file(tensors, str(weights))
    grid = tmp_path / "grid.png"
    argv = ["--model", str(folder), "--prompt", "a cat", "--prompt", "a dog", "--num-images", "1"]
    assert generate_cli.main(argv + ["--height", "64", "--width", "64", "--out", str(grid)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "error: generation produced NaN/inf for 2 of 2 samples: 0 ('a cat'), 1 ('a dog')"
    ), err
    assert "the vae weights hold NaN/inf" in err and len(err.strip().splitlines()) == 1
    assert not grid.exists()


# ---------------------------------------------------------------- issue 17: a new user's first hour


def test_default_size_is_the_models_native_size(tiny_pipeline_dir):
    """unet sample_size × VAE factor, read here from the folder's own config files (64 for tiny)."""
    import json

    with open(os.path.join(tiny_pipeline_dir, "unet", "config.json")) as f:
        sample_size = json.load(f)["sample_size"]
    with open(os.path.join(tiny_pipeline_dir, "vae", "config.json")) as f:
        factor = 2 ** (len(json.load(f)["block_out_channels"]) - 1)
    pipe = instaflow_jax.load_pipeline(tiny_pipeline_dir)
    assert pipe.native_size == (sample_size * factor,) * 2 != (512, 512)
    assert pipe.generate(["a red circle"], seed=2).shape == (1, sample_size * factor, sample_size * factor, 3)


def test_generate_runs_once_and_says_where_first(tiny_pipeline_dir, tmp_path, capsys, monkeypatch):
    calls = []
    original = instaflow_jax.Pipeline.generate
    monkeypatch.setattr(
        instaflow_jax.Pipeline, "generate", lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    )
    grid = tmp_path / "grid.png"
    argv = ["--model", tiny_pipeline_dir, "--prompt", "a red circle", "--num-images", "1", "--out", str(grid)]
    assert generate_cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert calls == [1], "generated more than once"
    assert str(grid) in lines[0] and "64×64" in lines[0]  # the native size, before any work
    assert any(line.startswith("compile time: ") for line in lines) and "ms/image" in lines[-1]


def test_a_request_that_cannot_fit_in_memory_is_one_line(tiny_pipeline_dir, tmp_path, capsys, monkeypatch):
    """Refused from XLA's estimate before running; XLA's own RESOURCE_EXHAUSTED is caught too."""
    import instaflow_jax.pipeline as pipeline_module

    argv = ["--model", tiny_pipeline_dir, "--prompt", "a red circle", "--num-images", "1"]
    argv += ["--out", str(tmp_path / "g.png")]
    monkeypatch.setattr(pipeline_module, "available_memory_bytes", lambda device: 1000)
    assert generate_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 1 image(s) at 64×64 do not fit in memory") and "GiB" in err, err
    assert "native size is 64×64" in err and len(err.strip().splitlines()) == 1

    def exhausted(*args):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 206318363648 bytes.")

    monkeypatch.setattr(instaflow_jax.Pipeline, "_executable", lambda self, *a: (exhausted, 1.0))
    monkeypatch.setattr(pipeline_module, "available_memory_bytes", lambda device: None)
    assert generate_cli.main(argv + ["--height", "512", "--width", "512"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 1 image(s) at 512×512 do not fit in memory (RESOURCE_EXHAUSTED"), err
    assert (
        "native size is 64×64" in err
        and len(err.strip().splitlines()) == 1
        and not os.path.exists(tmp_path / "g.png")
    )


def test_argparse_flag_errors_are_one_line_with_status_2(capsys):
    argv = ["--model", "tiny-random", "--prompt", "x", "--solver", "bogus"]
    assert generate_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: argument --solver: invalid choice: 'bogus'") and len(err.splitlines()) == 1
    assert interpolate_cli.main(["--model", "x", "--prompt", "y", "--frames", "many"]) == 2
    assert "error: argument --frames: invalid int value: 'many'" in capsys.readouterr().err


ARGPARSE_CLIS = {
    "instaflow-generate": "instaflow_jax.cli.generate",
    "instaflow-interpolate": "instaflow_jax.cli.interpolate",
    "instaflow-transfer": "instaflow_jax.cli.transfer",
    "instaflow-demo": "instaflow_jax.cli.demo",
}


@pytest.mark.parametrize("prog", sorted(ARGPARSE_CLIS))
def test_argparse_help_is_plain_and_documents_every_flag(prog):
    import importlib

    parser = importlib.import_module(ARGPARSE_CLIS[prog]).build_parser()
    text = parser.format_help()
    assert "``" not in text and ":func:" not in text, text
    for action in parser._actions:
        for option in action.option_strings:
            assert option in text, option
        assert action.help, f"{prog} {action.option_strings} has no help text"
    if "--height" in text:
        words = " ".join(text.split())
        assert "default: the model's native size" in words and "default 512" not in words


# absl programs: flags their --help must show (and their config keys), and a bad value of each.
ABSL_CLIS = {
    "instaflow-toy": (
        [sys.executable, "-m", "instaflow_jax.examples.toy"],
        ["--config", "--variant", "--workdir", "--verbosity", "--config.teacher.steps="],
        ["--variant", "bogus", "--workdir", "TMP/toy"],
        "error: unknown toy variant 'bogus'",
    ),
    "instaflow-train": (
        [sys.executable, "-m", "instaflow_jax.train"],
        ["--config", "--workdir", "--verbosity"],
        ["--config", "configs/reflow_sd15.py:tiny"],
        "error: --workdir is required (see --help).",
    ),
    "instaflow-generate-triplets": (
        [sys.executable, "-m", "instaflow_jax.generate_triplets"],
        ["--config", "--verbosity"],
        ["--config", "configs/triplets_sd15.py:tiny", "--config.no_such_key=1"],
        "error: unknown or invalid config override",
    ),
}


def test_absl_programs_have_a_plain_help_and_one_line_errors(tmp_path):
    """--help lists the program's own flags (not absl's "Try --helpfull"), exits 0; a bad value
    is one ``error:`` line with status 2, no traceback. All six runs in parallel."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    runs = {}
    for name, (command, _, bad, _) in ABSL_CLIS.items():
        bad = [arg.replace("TMP", str(tmp_path)) for arg in bad]
        for kind, args in (("help", ["--help"]), ("bad", bad)):
            runs[name, kind] = subprocess.Popen(
                command + args, cwd=root, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
    for (name, kind), process in runs.items():
        out, err = process.communicate(timeout=300)
        _, flags, _, message = ABSL_CLIS[name]
        if kind == "help":
            assert process.returncode == 0, (name, err)
            assert "helpfull to get" not in out and "``" not in out
            for flag in flags:
                assert flag in out, (name, flag, out)
        else:
            assert process.returncode == 2, (name, out, err)
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(message), (name, err)
    assert not (tmp_path / "toy").exists()


def test_tiny_random_is_made_once_per_user_under_a_lock(tmp_path, monkeypatch):
    import threading

    from instaflow_jax.weights import tiny
    from instaflow_jax.weights.tiny import resolve_model

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    made = []
    original = tiny.make_tiny_pipeline
    monkeypatch.setattr(
        tiny, "make_tiny_pipeline", lambda folder, seed: made.append(folder) or original(folder, seed)
    )
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(resolve_model("tiny-random"))) for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    folder = str(tmp_path / "instaflow_jax" / "tiny_random")
    assert results == [folder] * 3 and len(made) == 1 and made[0] != folder  # built aside, renamed in
    assert sorted(os.listdir(tmp_path / "instaflow_jax")) == ["tiny_random", "tiny_random.lock"]
    assert os.path.isfile(os.path.join(folder, "model_index.json"))
    assert resolve_model("tiny-random") == folder and len(made) == 1  # reused


def test_third_party_noise_is_off_by_default():
    """transformers' advice lines ("PyTorch was not found…") print before quiet_third_party, not after."""
    script = textwrap.dedent(
        """
        import os
        os.environ.pop("TRANSFORMERS_NO_ADVISORY_WARNINGS", None)
        os.environ.pop("TRANSFORMERS_VERBOSITY", None)
        from transformers.utils import logging
        logging.get_logger("transformers").warning_advice("ADVICE-BEFORE")
        from instaflow_jax.cli.common import quiet_third_party
        quiet_third_party()
        logging.get_logger("transformers").warning_advice("ADVICE-AFTER")
        logging.get_logger("transformers").warning("WARNING-AFTER")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "ADVICE-BEFORE" in done.stderr
    assert "ADVICE-AFTER" not in done.stderr and "WARNING-AFTER" not in done.stderr
