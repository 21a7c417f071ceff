"""Fine-tuned-base transfer: the output equals target + scale·(finetuned − base) done in numpy on
the PyTorch-named safetensors files, components the fine-tune left alone come from the target,
and folders of another family or architecture are refused with one clear line."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import instaflow_jax
from instaflow_jax.cli import generate as generate_cli
from instaflow_jax.cli import transfer as transfer_cli
from instaflow_jax.models import ConfigError
from instaflow_jax.testing import make_tiny_pipeline
from instaflow_jax.weights.folder import read_config

FILES = {
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
}


@pytest.fixture(scope="module")
def folders(tiny_pipeline_dir, tmp_path_factory):
    """base (the tiny pipeline), a fine-tune of every component, one of the UNet only, a target."""
    root = tmp_path_factory.mktemp("transfer")
    finetuned = make_tiny_pipeline(str(root / "finetuned"), seed=10)
    unet_only = shutil.copytree(tiny_pipeline_dir, root / "unet_only")
    shutil.rmtree(unet_only / "unet")
    shutil.copytree(os.path.join(finetuned, "unet"), unet_only / "unet")
    # Its text encoder is the base's saved in float16: rounding only, so still "unchanged".
    text = load_file(str(unet_only / FILES["text_encoder"]))
    half = {k: v.astype(np.float16) for k, v in text.items()}
    save_file(half, str(unet_only / FILES["text_encoder"]), metadata={"format": "pt"})
    target = make_tiny_pipeline(str(root / "target"), seed=20)
    return {"base": tiny_pipeline_dir, "finetuned": finetuned, "unet_only": str(unet_only), "target": target}


def _read(folder: str, component: str) -> dict[str, np.ndarray]:
    return load_file(os.path.join(folder, FILES[component]))


def test_transfer_equals_numpy_arithmetic(folders, tmp_path, capsys):
    out = str(tmp_path / "out")
    argv = ["--base", folders["base"], "--finetuned", folders["finetuned"], "--target", folders["target"]]
    assert transfer_cli.main([*argv, "--out", out, "--scale", "0.7"]) == 0
    printed = capsys.readouterr().out
    assert "unet: target + scale·(finetuned − base)" in printed and "vae: the fine-tune's" in printed
    for component in ("unet", "text_encoder"):
        base, finetuned = _read(folders["base"], component), _read(folders["finetuned"], component)
        target, ours = _read(folders["target"], component), _read(out, component)
        assert ours.keys() == target.keys()
        for key, value in target.items():
            expected = value + np.float32(0.7) * (finetuned[key] - base[key])
            np.testing.assert_allclose(
                ours[key], expected, rtol=1e-6, atol=1e-7, err_msg=f"{component} {key}"
            )
        assert max(np.abs(finetuned[k] - base[k]).max() for k in base) > 1e-2
    vae_ft, vae_out = _read(folders["finetuned"], "vae"), _read(out, "vae")
    assert all(np.array_equal(vae_out[k], vae_ft[k]) for k in vae_ft)
    assert instaflow_jax.load_pipeline(out).unet.config == read_config(
        os.path.join(folders["target"], "unet"), "unet"
    )
    # The README's next command: generate with the transferred folder.
    argv = ["--model", out, "--prompt", "a photo of sks dog", "--num-images", "1", "--height", "64"]
    assert generate_cli.main([*argv, "--width", "64", "--out", str(tmp_path / "grid.png")]) == 0
    assert os.path.getsize(tmp_path / "grid.png") > 0


def test_components_the_finetune_left_alone_come_from_the_target(folders, tmp_path):
    out = str(tmp_path / "out")
    report = instaflow_jax.transfer(folders["base"], folders["unet_only"], folders["target"], out, scale=1.0)
    assert report.actions == {"unet": "transferred", "text_encoder": "target", "vae": "target"}
    for component in ("text_encoder", "vae"):
        target, ours = _read(folders["target"], component), _read(out, component)
        assert all(np.array_equal(ours[k], target[k]) for k in target), component
    base, finetuned = _read(folders["base"], "unet"), _read(folders["unet_only"], "unet")
    target, ours = _read(folders["target"], "unet"), _read(out, "unet")
    for key in target:
        np.testing.assert_allclose(
            ours[key], target[key] + (finetuned[key] - base[key]), rtol=1e-6, atol=1e-7
        )


def test_transfer_refuses_other_architectures_and_families(folders, tmp_path, capsys):
    wide = shutil.copytree(folders["finetuned"], tmp_path / "wide")
    config = json.loads((wide / "unet" / "config.json").read_text())
    (wide / "unet" / "config.json").write_text(json.dumps({**config, "block_out_channels": [32, 96]}))
    with pytest.raises(ConfigError, match=r"unet of --finetuned differs in architecture.*block_out_channels"):
        instaflow_jax.transfer(folders["base"], str(wide), folders["target"], str(tmp_path / "o1"))
    sdxl = shutil.copytree(folders["target"], tmp_path / "sdxl")
    index = json.loads((sdxl / "model_index.json").read_text())
    (sdxl / "model_index.json").write_text(json.dumps({**index, "text_encoder_2": ["transformers", "X"]}))
    argv = ["--base", folders["base"], "--finetuned", folders["finetuned"], "--target", str(sdxl)]
    assert transfer_cli.main([*argv, "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --target: ") and "SDXL" in err and len(err.strip().splitlines()) == 1
    single_file = tmp_path / "model.safetensors"
    single_file.write_bytes(b"{}")
    argv = ["--base", folders["base"], "--finetuned", str(single_file), "--target", folders["target"]]
    assert transfer_cli.main([*argv, "--out", str(tmp_path / "o3")]) == 2
    assert "from_single_file" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match=r"--base: .*no such folder"):
        instaflow_jax.transfer(
            str(tmp_path / "none"), folders["finetuned"], folders["target"], str(tmp_path / "o4")
        )
    assert not any(os.path.exists(tmp_path / name) for name in ("o1", "o2", "o3", "o4"))
