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


def test_interpolate_cli_writes_frames_and_a_gif(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "walk"
    argv = ["--model", tiny_pipeline_dir, "--prompt", "a red circle", "--seeds", "2", "9", "--frames", "4"]
    argv += ["--batch", "3", "--height", "64", "--width", "64", "--out-dir", str(out)]
    assert interpolate_cli.main(argv) == 0
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


def test_readme_quick_start_command(tmp_path, capsys):
    """The README's first command: a random tiny pipeline made on the fly, offline."""
    grid = tmp_path / "grid.png"
    argv = [
        "--model",
        "tiny-random",
        "--prompt",
        "a small red circle",
        "--num-images",
        "4",
        "--out",
        str(grid),
    ]
    assert generate_cli.main(argv) == 0
    assert Image.open(grid).size == (4 * 66 - 2, 64)
    assert "ms/image" in capsys.readouterr().out


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
