"""Loading and saving whole pipeline folders: formats, round trips with PyTorch, bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import instaflow_jax
from instaflow_jax.conventions import nchw_to_nhwc, nhwc_to_nchw
from instaflow_jax.files import UnsafePathError
from instaflow_jax.models import ConfigError
from instaflow_jax.weights import safetensors_io
from instaflow_jax.weights.convert import WeightsMismatchError, flatten
from instaflow_jax.weights.folder import load_component
from instaflow_jax.weights.safetensors_io import SafetensorsError

from conftest import assert_close


@pytest.fixture()
def pipe_copy(tiny_pipeline_dir, tmp_path):
    """A private copy of the tiny pipeline that a test may break."""
    return shutil.copytree(tiny_pipeline_dir, tmp_path / "pipe")


def _edit_json(path, **changes):
    with open(path) as f:
        data = json.load(f)
    data.update(changes)
    with open(path, "w") as f:
        json.dump(data, f)


@pytest.fixture(scope="module")
def torch_pipeline(tiny_pipeline_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)


def test_diffusers_loads_our_folder_and_agrees(tiny_pipeline_dir, torch_pipeline):
    """JAX-written safetensors → PyTorch diffusers: same weights, same outputs."""
    pipe = instaflow_jax.load_pipeline(tiny_pipeline_dir)
    ref = torch_pipeline
    prompts = ["a photo of a cat", "a small red circle at the top left"]
    ids = pipe.tokenize(prompts)
    ref_ids = ref.tokenizer(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np"
    ).input_ids
    np.testing.assert_array_equal(ids, ref_ids)
    with torch.no_grad():
        ref_ctx = ref.text_encoder(torch.from_numpy(ids.astype(np.int64)))[0].numpy()
    context = pipe.encode_prompt(prompts)
    assert_close(context, ref_ctx, 1e-4, "text encoder")

    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    t = np.array([1000.0, 437.5], np.float32)
    with torch.no_grad():
        ref_v = ref.unet(
            torch.from_numpy(latents), torch.from_numpy(t), torch.from_numpy(ref_ctx)
        ).sample.numpy()
        ref_img = ref.vae.decode(torch.from_numpy(latents)).sample.numpy()
    v = jax.jit(pipe.unet.apply)({"params": pipe.params["unet"]}, nchw_to_nhwc(latents), t, ref_ctx)
    img = jax.jit(partial(pipe.vae.apply, method="decode"))(
        {"params": pipe.params["vae"]}, nchw_to_nhwc(latents)
    )
    assert_close(nhwc_to_nchw(v), ref_v, 1e-4, "UNet")
    assert_close(nhwc_to_nchw(img), ref_img, 1e-4, "VAE decode")


def test_torch_state_dicts_survive_a_jax_round_trip(torch_pipeline, tmp_path):
    """PyTorch weights → our tree → our save_pretrained → PyTorch: bit-identical state dicts."""
    from safetensors.torch import load_file

    for name, stem in (
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
    ):
        model = getattr(torch_pipeline, name)
        folder = tmp_path / name
        model.save_pretrained(str(folder))
        pipe_module, params = load_component(str(folder), name)
        out = tmp_path / f"{name}_resaved"
        from instaflow_jax.weights.folder import save_component

        save_component(str(out), name, pipe_module, params)
        resaved = load_file(str(out / f"{stem}.safetensors"))
        reference = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
        if name == "text_encoder":
            reference = {
                k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in reference.items()
            }
        assert resaved.keys() == reference.keys(), name
        for key, value in reference.items():
            assert torch.equal(resaved[key], value), f"{name}: {key}"


def test_pipeline_save_pretrained_round_trip(tiny_pipeline_dir, tmp_path):
    pipe = instaflow_jax.load_pipeline(tiny_pipeline_dir)
    pipe.save_pretrained(str(tmp_path / "copy"))
    again = instaflow_jax.load_pipeline(str(tmp_path / "copy"))
    jax.tree.map(np.testing.assert_array_equal, again.params, pipe.params)
    np.testing.assert_array_equal(again.tokenize("a red circle"), pipe.tokenize("a red circle"))


def test_bin_variant_and_sharded_files(tiny_pipeline_dir, tmp_path):
    """.bin (via torch), *.fp16.safetensors variants and sharded index files give the same tree."""
    src = os.path.join(tiny_pipeline_dir, "unet")
    _, reference = load_component(src, "unet")
    state = safetensors_io.load(os.path.join(src, "diffusion_pytorch_model.safetensors"))

    binary = tmp_path / "bin"
    binary.mkdir()
    shutil.copy(os.path.join(src, "config.json"), binary)
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, binary / "diffusion_pytorch_model.bin")
    _, params = load_component(str(binary), "unet")
    jax.tree.map(np.testing.assert_array_equal, params, reference)

    variant = tmp_path / "variant"
    variant.mkdir()
    shutil.copy(os.path.join(src, "config.json"), variant)
    safetensors_io.save(
        variant / "diffusion_pytorch_model.fp16.safetensors",
        {k: v.astype(np.float16) for k, v in state.items()},
    )
    with pytest.raises(FileNotFoundError, match="variant"):
        load_component(str(variant), "unet", variant="bf16")
    _, params = load_component(str(variant), "unet", variant="fp16", param_dtype="float16")
    assert all(x.dtype == np.float16 for x in jax.tree.leaves(params))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b.astype(np.float16)), params, reference)

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(os.path.join(src, "config.json"), sharded)
    keys = sorted(state)
    halves = {"part-1.safetensors": keys[: len(keys) // 2], "part-2.safetensors": keys[len(keys) // 2 :]}
    for shard, names in halves.items():
        safetensors_io.save(sharded / shard, {k: state[k] for k in names})
    index = {"metadata": {}, "weight_map": {k: shard for shard, names in halves.items() for k in names}}
    (sharded / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    _, params = load_component(str(sharded), "unet")
    jax.tree.map(np.testing.assert_array_equal, params, reference)


def test_hub_id_resolves_from_local_cache_only(tiny_pipeline_dir, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-flow" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_pipeline_dir, snapshot)
    (cache / "models--someone--tiny-flow" / "refs").mkdir()
    (cache / "models--someone--tiny-flow" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    pipe = instaflow_jax.load_pipeline("someone/tiny-flow")
    assert pipe.source == str(snapshot)
    with pytest.raises(FileNotFoundError, match="Download it first"):
        instaflow_jax.load_pipeline("someone/not-downloaded")


# ---------------------------------------------------------------- bad input, one clear error each


def test_missing_folder():
    with pytest.raises(FileNotFoundError, match=r"no such folder.*model_index.json"):
        instaflow_jax.load_pipeline("/nonexistent/sd15")


def test_component_folder_instead_of_pipeline(tiny_pipeline_dir):
    with pytest.raises(FileNotFoundError, match="single component folder"):
        instaflow_jax.load_pipeline(os.path.join(tiny_pipeline_dir, "unet"))


def test_missing_subfolder(pipe_copy):
    shutil.rmtree(pipe_copy / "tokenizer")
    with pytest.raises(FileNotFoundError, match=r"\['tokenizer'\] are missing"):
        instaflow_jax.load_pipeline(str(pipe_copy))


def test_missing_weights_lists_what_is_there(pipe_copy):
    os.remove(pipe_copy / "vae" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"no vae weights found.*holds \['config.json'\]"):
        instaflow_jax.load_pipeline(str(pipe_copy))


def test_sdxl_folder_is_refused(pipe_copy):
    _edit_json(pipe_copy / "model_index.json", text_encoder_2=["transformers", "CLIPTextModelWithProjection"])
    with pytest.raises(ConfigError, match="SDXL"):
        instaflow_jax.load_pipeline(str(pipe_copy))


def test_sdxl_unet_config_is_refused(pipe_copy):
    _edit_json(pipe_copy / "unet" / "config.json", addition_embed_type="text_time")
    with pytest.raises(ConfigError, match=r"addition_embed_type='text_time'.*SDXL"):
        instaflow_jax.load_pipeline(str(pipe_copy))


def test_sd2_unet_is_refused(pipe_copy):
    _edit_json(pipe_copy / "unet" / "config.json", use_linear_projection=True, cross_attention_dim=1024)
    with pytest.raises(ConfigError, match=r"use_linear_projection=True.*SD 2"):
        instaflow_jax.load_pipeline(str(pipe_copy))


def test_cross_attention_width_mismatch(pipe_copy):
    _edit_json(pipe_copy / "unet" / "config.json", cross_attention_dim=48)
    with pytest.raises(ConfigError, match="48-wide text features but the text encoder produces 32"):
        instaflow_jax.load_pipeline(str(pipe_copy))


def test_inpainting_unet_is_refused(pipe_copy):
    _edit_json(pipe_copy / "unet" / "config.json", in_channels=9)
    with pytest.raises(ConfigError, match="9 → 4 channels"):
        instaflow_jax.load_pipeline(str(pipe_copy))


def test_weights_that_do_not_fit_the_config(pipe_copy):
    _edit_json(pipe_copy / "unet" / "config.json", block_out_channels=[32, 48])
    with pytest.raises(WeightsMismatchError, match=r"mis-shaped \(\d+\): .*checkpoint .* vs model"):
        instaflow_jax.load_pipeline(str(pipe_copy))


def test_missing_and_unexpected_keys_are_named(pipe_copy):
    path = pipe_copy / "unet" / "diffusion_pytorch_model.safetensors"
    state = safetensors_io.load(path)
    state["extra.weight"] = state.pop("conv_in.weight")
    safetensors_io.save(path, state)
    with pytest.raises(
        WeightsMismatchError, match=r"(?s)missing \(1\): conv_in/kernel.*unexpected \(1\): extra/kernel"
    ):
        instaflow_jax.load_pipeline(str(pipe_copy))


def test_truncated_weights(pipe_copy):
    path = pipe_copy / "text_encoder" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(SafetensorsError, match=r"model.safetensors.*truncated"):
        instaflow_jax.load_pipeline(str(pipe_copy))


def test_wrong_dtype_name(tiny_pipeline_dir):
    with pytest.raises(ValueError, match=r"unknown dtype name 'bf17'.*bfloat16"):
        instaflow_jax.load_pipeline(tiny_pipeline_dir, dtype="bf17")


def test_other_model_class_is_refused(pipe_copy):
    _edit_json(pipe_copy / "vae" / "config.json", _class_name="VQModel")
    with pytest.raises(ConfigError, match="expected a config of class AutoencoderKL, found class 'VQModel'"):
        instaflow_jax.load_pipeline(str(pipe_copy))


def test_bf16_params_load_and_run(tiny_pipeline_dir):
    pipe = instaflow_jax.load_pipeline(tiny_pipeline_dir, dtype="bf16", param_dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(pipe.params)} == {jnp.dtype(jnp.bfloat16)}
    context = pipe.encode_prompt("a cat")
    assert context.dtype == jnp.float32 and bool(jnp.isfinite(context).all())
    assert flatten(pipe.params["unet"])  # non-empty tree


BROKEN_JSON = [
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "scheduler/scheduler_config.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
]


def test_broken_json_names_the_file_and_what_to_do(pipe_copy, capsys):
    """The probe: a truncated JSON gave a bare 'Expecting value: line 1 column 12'."""
    from instaflow_jax.cli import generate as generate_cli

    for name in BROKEN_JSON:
        path = pipe_copy / name
        original = path.read_bytes()
        for broken, problem in (
            (original[:11], r"is not valid JSON \(.*: line \d+, column \d+ of 11 bytes\)"),
            (b"", "is empty"),
        ):
            path.write_bytes(broken)
            assert generate_cli.main(["--model", str(pipe_copy), "--prompt", "x"]) == 2, name
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "Traceback" not in err, err
            assert re.match(rf"error: {re.escape(str(path))} {problem}.*Download or save", err), err
        path.write_bytes(b"[1, 2]")
        with pytest.raises(
            ValueError, match=rf"{re.escape(str(path))} holds a JSON list; expected a JSON object"
        ):
            instaflow_jax.load_pipeline(str(pipe_copy))
        path.write_bytes(original)


@pytest.fixture()
def sharded_unet(tiny_pipeline_dir, tmp_path):
    """A UNet folder split into two shards listed by an index; returns (folder, reference params)."""
    src = os.path.join(tiny_pipeline_dir, "unet")
    _, reference = load_component(src, "unet")
    state = safetensors_io.load(os.path.join(src, "diffusion_pytorch_model.safetensors"))
    folder = tmp_path / "sharded"
    folder.mkdir()
    shutil.copy(os.path.join(src, "config.json"), folder)
    keys = sorted(state)
    halves = {"part-1.safetensors": keys[: len(keys) // 2], "part-2.safetensors": keys[len(keys) // 2 :]}
    for shard, names in halves.items():
        safetensors_io.save(folder / shard, {k: state[k] for k in names})
    index = {"metadata": {}, "weight_map": {k: shard for shard, names in halves.items() for k in names}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return folder, reference


def _set_weight_map(folder, old: str, new: str) -> None:
    path = folder / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(path.read_text())
    index["weight_map"] = {k: (new if v == old else v) for k, v in index["weight_map"].items()}
    path.write_text(json.dumps(index))


def test_index_weight_map_entries_stay_inside_the_folder(sharded_unet, tmp_path):
    """The probe: weight_map entries '../x' or '/abs/x' were read from outside the model folder."""
    folder, _ = sharded_unet
    outside = tmp_path / "outside.safetensors"
    shutil.move(folder / "part-2.safetensors", outside)
    for entry, problem in (("../outside.safetensors", r"'\.\.'"), (str(outside), "an absolute path")):
        _set_weight_map(folder, "part-2.safetensors", entry)
        with pytest.raises(UnsafePathError, match=rf"index\.json: file entry .* is {problem}"):
            load_component(str(folder), "unet")
        _set_weight_map(folder, entry, "part-2.safetensors")
    (folder / "part-2.safetensors").symlink_to(outside)
    with pytest.raises(UnsafePathError, match=r"part-2.safetensors' is a symbolic link to .*outside"):
        load_component(str(folder), "unet")


def test_hugging_face_cache_links_into_blobs_still_load(sharded_unet, tmp_path):
    """Snapshot files of the hub cache are links to ../../blobs: inside the repo, so allowed."""
    folder, reference = sharded_unet
    repo = tmp_path / "hub" / "models--someone--sharded"
    unet = repo / "snapshots" / ("0" * 40) / "unet"
    unet.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for name in os.listdir(folder):
        shutil.move(folder / name, repo / "blobs" / f"blob-{name}")
        (unet / name).symlink_to(os.path.join("..", "..", "..", "blobs", f"blob-{name}"))
    _, params = load_component(str(unet), "unet")
    jax.tree.map(np.testing.assert_array_equal, params, reference)
