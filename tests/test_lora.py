"""LoRA files against PyTorch diffusers/PEFT on the tiny pipeline.

A PEFT adapter with random non-zero ``lora_B`` is added to the tiny diffusers UNet (attention,
feed-forward, 1×1 projections and 3×3 convolutions: LoCon) and CLIP text encoder and saved with
``StableDiffusionPipeline.save_lora_weights``; the tests rename the same tensors into kohya/A1111
and pre-PEFT diffusers naming themselves. Each file loaded by diffusers' ``load_lora_weights`` +
``fuse_lora`` and run with InstaFlow's Euler loop gives our ``with_lora`` images.
"""

from __future__ import annotations

import os
import warnings

import jax.monitoring
import numpy as np
import pytest
import torch
from PIL import Image
from test_sampling import torch_euler

import instaflow_jax
from instaflow_jax.cli import generate as generate_cli
from instaflow_jax.cli.extensions import parse_lora
from instaflow_jax.weights.convert import flatten
from instaflow_jax.weights.lora import read_lora

PROMPTS = ["a small red circle at the top left", "a photo of a cat"]
SCALE = 0.8
UNET_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "time_emb_proj",
    "conv",
    "conv_in",
    "conv_out",
    "linear_1",
]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
UNET_RANK, UNET_ALPHA, TEXT_RANK, TEXT_ALPHA = 4, 8.0, 2, 3.0
GENERATE = dict(num_steps=2, guidance_scale=1.5, negative_prompt="blue", height=64, width=64)


def _split(key: str) -> tuple[str, str, str]:
    """PEFT key ``unet.<module>.lora_A.weight`` → (component, module path, "A" or "B")."""
    component, rest = key.split(".", 1)
    module, ab = rest.rsplit(".lora_", 1)
    if component == "text_encoder" and not module.startswith("text_model."):
        module = "text_model." + module
    return component, module, ab[0]


def to_kohya(state: dict, alphas: dict) -> dict:
    out = {}
    for key, value in state.items():
        component, module, ab = _split(key)
        name = ("lora_unet_" if component == "unet" else "lora_te_") + module.replace(".", "_")
        out[f"{name}.lora_{'down' if ab == 'A' else 'up'}.weight"] = value
        out[f"{name}.alpha"] = torch.tensor(alphas[component])
    return out


def to_old_diffusers(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        component, module, ab = _split(key)
        middle = ".lora." if component == "unet" else ".lora_linear_layer."
        out[f"{component}.{module}{middle}{'down' if ab == 'A' else 'up'}.weight"] = value
    return out


@pytest.fixture(scope="module")
def lora_files(tiny_pipeline_dir, tmp_path_factory):
    """{"peft", "kohya", "diffusers", "second"} → .safetensors paths; "state" → the PEFT tensors."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("loras")
    torch_pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    torch.manual_seed(0)
    unet_config = LoraConfig(
        r=UNET_RANK, lora_alpha=UNET_ALPHA, init_lora_weights=False, target_modules=UNET_TARGETS
    )
    text_config = LoraConfig(
        r=TEXT_RANK, lora_alpha=TEXT_ALPHA, init_lora_weights=False, target_modules=TEXT_TARGETS
    )
    torch_pipe.unet.add_adapter(unet_config)
    torch_pipe.text_encoder.add_adapter(text_config)
    unet_state = get_peft_model_state_dict(torch_pipe.unet)
    text_state = get_peft_model_state_dict(torch_pipe.text_encoder)
    StableDiffusionPipeline.save_lora_weights(
        str(root / "peft"),
        unet_lora_layers=unet_state,
        text_encoder_lora_layers=text_state,
        unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=text_config.to_dict(),
    )
    state = {f"unet.{k}": v for k, v in unet_state.items()}
    state.update({f"text_encoder.{k}": v for k, v in text_state.items()})
    alphas = {"unet": UNET_ALPHA, "text_encoder": TEXT_ALPHA}
    save_file(to_kohya(state, alphas), str(root / "kohya.safetensors"))
    save_file(to_old_diffusers(state), str(root / "diffusers.safetensors"))
    gen = torch.Generator().manual_seed(1)
    second = {k: 0.2 * torch.randn(v.shape, generator=gen) for k, v in state.items()}
    save_file(to_kohya(second, {"unet": 2.0, "text_encoder": 1.0}), str(root / "second.safetensors"))
    return {
        "peft": str(root / "peft" / "pytorch_lora_weights.safetensors"),
        "kohya": str(root / "kohya.safetensors"),
        "diffusers": str(root / "diffusers.safetensors"),
        "second": str(root / "second.safetensors"),
        "state": {k: v.detach().numpy() for k, v in state.items()},
        "second_state": {k: v.numpy() for k, v in second.items()},
        "root": root,
    }


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    return instaflow_jax.load_pipeline(tiny_pipeline_dir)


@pytest.fixture(scope="module")
def noise():
    return np.random.default_rng(7).standard_normal((2, 4, 8, 8)).astype(np.float32)


@pytest.mark.parametrize("fmt", ["peft", "kohya", "diffusers"])
def test_lora_files_match_diffusers_load_lora_weights(tiny_pipeline_dir, lora_files, pipe, noise, fmt):
    from diffusers import StableDiffusionPipeline

    reference = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    reference.load_lora_weights(lora_files[fmt])
    reference.fuse_lora(lora_scale=SCALE)
    _, expected = torch_euler(reference, PROMPTS, noise, 2, 1.5, "blue")
    merged = pipe.with_lora(lora_files[fmt], scale=SCALE)
    images = merged.generate(PROMPTS, latents=noise, **GENERATE)
    base = pipe.generate(PROMPTS, latents=noise, **GENERATE)
    assert np.abs(base - expected).max() > 1e-2, "the LoRA must change the images"
    assert np.abs(images - expected).max() <= 1e-4, (
        f"{fmt}: max abs error {np.abs(images - expected).max():.3g}"
    )


def test_with_lora_leaves_the_base_bit_for_bit_and_compiles_nothing(pipe, lora_files, noise):
    before = pipe.generate(PROMPTS, latents=noise, **GENERATE)  # compiled by now
    base_params = {k: np.array(v) for k, v in flatten(pipe.params["unet"]).items()}
    events = []
    listener = lambda name, *args, **kwargs: events.append(name)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        merged = pipe.with_lora(lora_files["kohya"], scale=SCALE)
        with_lora = merged.generate(PROMPTS, latents=noise, **GENERATE)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert [e for e in events if "compile" in e] == [] and merged.last_timings.compile_s == 0.0
    after = pipe.generate(PROMPTS, latents=noise, **GENERATE)
    np.testing.assert_array_equal(after, before)
    assert np.abs(with_lora - before).max() > 1e-2
    for key, value in flatten(pipe.params["unet"]).items():
        np.testing.assert_array_equal(np.asarray(value), base_params[key])


def _delta(state: dict, component: str, module: str, alpha: float) -> np.ndarray:
    """(alpha / r) · B @ A of one module in PyTorch layout, from the PEFT-named tensors."""
    prefix = f"{component}.{module.removeprefix('text_model.') if component == 'text_encoder' else module}"
    down, up = state[f"{prefix}.lora_A.weight"], state[f"{prefix}.lora_B.weight"]
    rank = down.shape[0]
    product = up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)
    return (alpha / rank) * product.reshape((up.shape[0], *down.shape[1:]))


@pytest.mark.parametrize(
    "component, module, flax_path",
    [
        ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", "kernel"),
        ("unet", "down_blocks.0.resnets.0.conv1", "kernel"),
        ("unet", "up_blocks.1.resnets.1.conv_shortcut", "kernel"),
        ("text_encoder", "text_model.encoder.layers.1.mlp.fc1", "kernel"),
    ],
)
def test_two_loras_add_their_scaled_deltas(pipe, lora_files, component, module, flax_path):
    merged = pipe.with_lora(lora_files["peft"], scale=SCALE).with_lora(lora_files["second"], scale=-0.5)
    alphas = {"unet": (UNET_ALPHA, 2.0), "text_encoder": (TEXT_ALPHA, 1.0)}[component]
    delta = SCALE * _delta(lora_files["state"], component, module, alphas[0])
    delta = delta - 0.5 * _delta(lora_files["second_state"], component, module, alphas[1])
    if component == "unet":
        parts = []
        for part in module.split("."):
            if part.isdigit():
                parts[-1] = f"{parts[-1]}_{part}"
            else:
                parts.append(part)
        path = (*parts, flax_path)
    else:
        path = (*module.split("."), flax_path)
    delta = delta.transpose(2, 3, 1, 0) if delta.ndim == 4 else delta.T  # PyTorch → Flax layout
    base = np.asarray(flatten(pipe.params[component])[path])
    ours = np.asarray(flatten(merged.params[component])[path])
    np.testing.assert_allclose(ours, base + delta, rtol=1e-5, atol=1e-6)
    assert np.abs(delta).max() > 1e-3


def test_tucker_locon_equals_its_three_convolutions(pipe, lora_files):
    """LyCORIS' ``lora_mid``: merged kernel = up ∘ mid ∘ down as PyTorch convolutions."""
    from safetensors.torch import save_file

    rng = np.random.default_rng(4)
    rank, alpha, channels = 3, 1.5, 32
    down = rng.standard_normal((rank, channels, 1, 1)).astype(np.float32)
    mid = rng.standard_normal((rank, rank, 3, 3)).astype(np.float32)
    up = rng.standard_normal((channels, rank, 1, 1)).astype(np.float32)
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    tensors = {"lora_down.weight": down, "lora_mid.weight": mid, "lora_up.weight": up}
    tensors = {f"{name}.{k}": torch.from_numpy(v) for k, v in tensors.items()}
    tensors[f"{name}.alpha"] = torch.tensor(alpha)
    path = str(lora_files["root"] / "tucker.safetensors")
    save_file(tensors, path)
    merged = pipe.with_lora(path, scale=0.5)
    key = ("down_blocks_0", "resnets_0", "conv1", "kernel")
    kernel = np.asarray(flatten(merged.params["unet"])[key]) - np.asarray(flatten(pipe.params["unet"])[key])
    x = torch.from_numpy(rng.standard_normal((1, channels, 6, 6)).astype(np.float32))
    conv = torch.nn.functional.conv2d
    expected = (
        0.5
        * (alpha / rank)
        * conv(conv(conv(x, torch.from_numpy(down)), torch.from_numpy(mid), padding=1), torch.from_numpy(up))
    )
    ours = conv(x, torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()), padding=1)
    np.testing.assert_allclose(ours.numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)


def test_unmatched_keys_are_an_error_or_skipped_and_listed(pipe, lora_files):
    from safetensors.torch import load_file, save_file

    tensors = load_file(lora_files["kohya"])
    tensors["lora_unet_down_blocks_7_resnets_0_conv1.lora_down.weight"] = torch.ones(4, 32, 3, 3)
    tensors["lora_unet_down_blocks_7_resnets_0_conv1.lora_up.weight"] = torch.ones(32, 4, 1, 1)
    tensors["lora_unet_mid_block_resnets_0_conv1.hada_w1_a"] = torch.ones(4, 4)
    path = str(lora_files["root"] / "extra.safetensors")
    save_file(tensors, path)
    with pytest.raises(
        instaflow_jax.LoRAError, match=r"lora_unet_down_blocks_7_resnets_0_conv1\.lora_down"
    ) as err:
        pipe.with_lora(path)
    assert "hada_w1_a" in str(err.value) and "strict=False" in str(err.value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = pipe.with_lora(path, strict=False)
    assert any("down_blocks_7" in str(w.message) for w in caught)
    assert merged.lora_skipped == sorted(
        [
            "lora_unet_down_blocks_7_resnets_0_conv1.lora_down.weight",
            "lora_unet_down_blocks_7_resnets_0_conv1.lora_up.weight",
            "lora_unet_mid_block_resnets_0_conv1.hada_w1_a",
        ]
    )
    reference = pipe.with_lora(lora_files["kohya"])
    for a, b in zip(flatten(merged.params["unet"]).values(), flatten(reference.params["unet"]).values()):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _write(path, tensors):
    from safetensors.torch import save_file

    save_file({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in tensors.items()}, str(path))
    return str(path)


SD1_TO_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
SDXL_TE2 = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
SDXL_SGM = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
OTHER_ARCHITECTURES = {
    "sdxl-text-encoder-2": (
        {
            f"{SDXL_TE2}.lora_down.weight": np.ones((4, 1280)),
            f"{SDXL_TE2}.lora_up.weight": np.ones((1280, 4)),
        },
        "SDXL",
    ),
    "sdxl-sgm-names": (
        {f"{SDXL_SGM}.lora_down.weight": np.ones((4, 2048)), f"{SDXL_SGM}.lora_up.weight": np.ones((640, 4))},
        "SDXL",
    ),
    "2048-wide": (
        {f"{SD1_TO_K}.lora_down.weight": np.ones((4, 2048)), f"{SD1_TO_K}.lora_up.weight": np.ones((32, 4))},
        "maps 2048 → 32 features .* another architecture",
    ),
    "flux": ({"transformer.single_blocks.0.attn.to_q.lora_A.weight": np.ones((4, 8))}, "DiT"),
}


@pytest.mark.parametrize("case", list(OTHER_ARCHITECTURES))
def test_lora_for_another_architecture_is_a_one_line_error(pipe, tmp_path, case):
    tensors, message = OTHER_ARCHITECTURES[case]
    path = _write(tmp_path / "other.safetensors", tensors)
    with pytest.raises(instaflow_jax.LoRAError, match=message) as err:
        pipe.with_lora(path)
    assert "\n" not in str(err.value)


def test_generate_cli_bad_lora_is_one_error_line(tiny_pipeline_dir, tmp_path, capsys):
    path = _write(tmp_path / "sdxl.safetensors", OTHER_ARCHITECTURES["sdxl-sgm-names"][0])
    argv = ["--model", tiny_pipeline_dir, "--prompt", "x", "--height", "64", "--width", "64", "--lora", path]
    assert generate_cli.main(argv) == 2
    printed = capsys.readouterr().err
    assert printed.startswith("error: ") and len(printed.strip().splitlines()) == 1 and "SDXL" in printed


def test_lora_argument_parsing(tmp_path):
    assert parse_lora("style.safetensors") == ("style.safetensors", 1.0)
    assert parse_lora("style.safetensors:0.6") == ("style.safetensors", 0.6)
    assert parse_lora("C:/loras/style.safetensors") == ("C:/loras/style.safetensors", 1.0)
    assert parse_lora("C:/loras/style.safetensors:-1") == ("C:/loras/style.safetensors", -1.0)
    with pytest.raises(FileNotFoundError, match="no such LoRA file"):
        read_lora(str(tmp_path / "missing.safetensors"))
    (tmp_path / "model.ckpt").write_bytes(b"x")
    with pytest.raises(instaflow_jax.LoRAError, match=r"\.safetensors only"):
        read_lora(str(tmp_path / "model.ckpt"))


def test_generate_cli_with_loras_equals_the_library(tiny_pipeline_dir, lora_files, pipe, tmp_path):
    """The README's LoRA command: two LoRAs with their own scales."""
    argv = ["--model", tiny_pipeline_dir, "--prompt", "a cat", "--num-images", "2", "--steps", "2"]
    argv += ["--guidance", "1.5", "--negative-prompt", "blue", "--height", "64", "--width", "64"]
    argv += ["--lora", f"{lora_files['peft']}:{SCALE}", "--lora", lora_files["second"] + ":-0.5"]
    argv += ["--out", str(tmp_path / "grid.png"), "--out-dir", str(tmp_path / "each")]
    assert generate_cli.main(argv) == 0
    merged = pipe.with_lora(lora_files["peft"], scale=SCALE).with_lora(lora_files["second"], scale=-0.5)
    expected = merged.generate(["a cat"] * 2, seed=0, **GENERATE)
    saved = np.asarray(Image.open(os.path.join(tmp_path, "each", "0001.png")), np.float32) / 255.0
    np.testing.assert_allclose(saved, expected[1], atol=1 / 255 + 1e-5)
