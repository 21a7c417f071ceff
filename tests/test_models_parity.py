"""Numerical parity of the Flax ports with PyTorch diffusers/transformers on tiny random models.

Each reference model is built by the PyTorch library itself, saved with its own
``save_pretrained`` and loaded with our loader: names, layouts and numerics are all tested.
"""

from __future__ import annotations

import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from instaflow_jax.conventions import nchw_to_nhwc, nhwc_to_nchw
from instaflow_jax.models import attention
from instaflow_jax.weights.convert import flatten
from instaflow_jax.weights.folder import load_component, read_msgpack, save_component

from conftest import assert_close, perturb_torch_

UNET_KW = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(16, 32, 32),
    attention_head_dim=(2, 4, 4),
    cross_attention_dim=24,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=8,
)
VAE_KW = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=4,
    block_out_channels=(8, 16, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    sample_size=32,
)


# "blockwise" tiles for the tiny models: 64 tokens become 8 × 6 tiles, 16 become 2 × 2, with padded keys.
SMALL_TILES = (8, 12)


@pytest.fixture(scope="module")
def torch_unet(tmp_path_factory):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = perturb_torch_(UNet2DConditionModel(**UNET_KW), seed=1)
    folder = str(tmp_path_factory.mktemp("unet"))
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def jax_unet(torch_unet):
    module, params = load_component(torch_unet[1], "unet")
    return module, params, jax.jit(lambda p, x, t, c: module.apply({"params": p}, x, t, c))


def _torch_unet_out(model, sample, t, context):
    with torch.no_grad():
        return model(
            torch.from_numpy(sample), torch.from_numpy(np.asarray(t)), torch.from_numpy(context)
        ).sample.numpy()


@pytest.mark.parametrize(
    "timesteps, batch, hw",
    [
        (np.array([1000.0, 1000.0], np.float32), 2, (8, 8)),  # InstaFlow's one-step timestep
        (np.array([1000.0, 437.5], np.float32), 2, (8, 8)),  # a batch of different, fractional t
        (np.array([999.0, 437.5, 1.25], np.float32), 3, (8, 8)),
        (np.array([750.0], np.float32), 1, (10, 6)),  # sides not multiples of 4: resized upsampling
    ],
)
def test_unet_matches_diffusers(torch_unet, jax_unet, timesteps, batch, hw):
    model, _ = torch_unet
    _, params, apply = jax_unet
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((batch, 4) + hw).astype(np.float32)
    context = rng.standard_normal((batch, 7, 24)).astype(np.float32)
    ref = _torch_unet_out(model, sample, timesteps, context)
    ours = nhwc_to_nchw(apply(params, nchw_to_nhwc(jnp.asarray(sample)), timesteps, context))
    assert_close(ours, ref, 1e-4, f"UNet t={timesteps.tolist()} hw={hw}")


def test_unet_with_blockwise_attention_matches_diffusers(torch_unet, monkeypatch):
    """``attention_impl="blockwise"`` (the default "auto" is XLA at these sizes, tested above)."""
    monkeypatch.setattr(attention, "BLOCKWISE_BLOCK_SIZES", SMALL_TILES)
    model, folder = torch_unet
    module, params = load_component(folder, "unet", attention_impl="blockwise")
    rng = np.random.default_rng(1)
    sample = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    context = rng.standard_normal((2, 7, 24)).astype(np.float32)
    t = np.array([1000.0, 437.5], np.float32)
    ours = jax.jit(module.apply)({"params": params}, nchw_to_nhwc(jnp.asarray(sample)), t, context)
    assert_close(nhwc_to_nchw(ours), _torch_unet_out(model, sample, t, context), 1e-4, "blockwise UNet")


@pytest.fixture(scope="module")
def tiny_unet():
    """The small UNet of ``instaflow_jax.testing`` with random params (no torch involved)."""
    from instaflow_jax.models import UNet2DConditionModel
    from instaflow_jax.testing import random_params, tiny_unet_config

    module = UNet2DConditionModel(tiny_unet_config())
    params = jax.device_put(random_params(module, "unet", seed=0))
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    c = jax.random.normal(jax.random.key(1), (2, 7, 32))
    return module, params, x, c


def test_unet_scalar_timestep_broadcasts(tiny_unet):
    module, params, x, c = tiny_unet
    apply = jax.jit(module.apply)
    np.testing.assert_array_equal(
        apply({"params": params}, x, 1000.0, c), apply({"params": params}, x, jnp.full((2,), 1000.0), c)
    )


def test_unet_bf16_compute_keeps_fp32_where_the_method_says(tiny_unet):
    """bf16 convs/matmuls, but the timestep embedding MLP and the output stay float32."""
    from instaflow_jax.models import UNet2DConditionModel

    module, params, x, c = tiny_unet
    bf16 = UNet2DConditionModel(module.config, dtype=jnp.bfloat16)
    t = jnp.array([750.0, 437.5])
    out, state = jax.jit(partial(bf16.apply, capture_intermediates=True))({"params": params}, x, t, c)
    assert out.dtype == jnp.float32
    assert state["intermediates"]["time_embedding"]["__call__"][0].dtype == jnp.float32
    assert state["intermediates"]["conv_in"]["__call__"][0].dtype == jnp.bfloat16
    assert_close(out, jax.jit(module.apply)({"params": params}, x, t, c), 5e-2, "bf16 vs fp32 UNet")
    # 750 and 752 are one bf16 ulp apart; float32 time embeddings keep them distinct.
    capture = jax.jit(partial(bf16.apply, capture_intermediates=True, mutable=["intermediates"]))
    temb = lambda t: capture({"params": params}, x, t, c)[1]["intermediates"]["time_embedding"]["__call__"][0]
    assert float(jnp.abs(temb(750.0) - temb(752.0)).max()) > 0


def test_unet_remat_is_exact_and_saves_memory(tiny_unet):
    """Same gradients, and a smaller live set by XLA's own accounting. Without
    ``remat_compiler_options`` XLA:CPU merges the recomputation back into the forward pass and
    the two compiled programs are the same size (the first assertion below then fails)."""
    from instaflow_jax.models import UNet2DConditionModel
    from instaflow_jax.parallel import remat_compiler_options

    module, params, x, c = tiny_unet
    x, c = jnp.tile(x, (4, 1, 1, 1)), jnp.tile(c, (4, 1, 1))  # activations, not weights, dominate
    remat = UNet2DConditionModel(module.config, remat=True)

    def compiled(m):
        grad = jax.grad(lambda p: (m.apply({"params": p}, x, 500.0, c) ** 2).mean())
        return jax.jit(grad, compiler_options=remat_compiler_options(m.remat)).lower(params).compile()

    plain_fn, remat_fn = compiled(module), compiled(remat)
    temp = lambda f: f.memory_analysis().temp_size_in_bytes
    assert temp(remat_fn) < 0.8 * temp(plain_fn), (temp(remat_fn), temp(plain_fn))
    for a, b in zip(jax.tree.leaves(plain_fn(params)), jax.tree.leaves(remat_fn(params))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def torch_vae(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    model = perturb_torch_(AutoencoderKL(**VAE_KW), seed=2)
    folder = str(tmp_path_factory.mktemp("vae"))
    model.save_pretrained(folder)
    return model, folder


def test_vae_with_blockwise_attention_matches_diffusers(torch_vae, monkeypatch):
    """The mid-block attention (16 tokens, one head of 16 here) as ``"blockwise"``, both directions."""
    monkeypatch.setattr(attention, "BLOCKWISE_BLOCK_SIZES", SMALL_TILES)
    model, folder = torch_vae
    module, params = load_component(folder, "vae", attention_impl="blockwise")
    rng = np.random.default_rng(1)
    image = rng.uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    latent = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
    with torch.no_grad():
        mean = model.encode(torch.from_numpy(image)).latent_dist.mean.numpy()
        decoded = model.decode(torch.from_numpy(latent)).sample.numpy()
    both = jax.jit(
        lambda p, x, z: (
            module.apply(p, x, method="encode").mean,
            module.apply(p, z, method="decode"),
        )
    )
    ours_mean, ours_dec = both(
        {"params": params}, nchw_to_nhwc(jnp.asarray(image)), nchw_to_nhwc(jnp.asarray(latent))
    )
    assert_close(nhwc_to_nchw(ours_mean), mean, 1e-4, "blockwise VAE posterior mean")
    assert_close(nhwc_to_nchw(ours_dec), decoded, 1e-4, "blockwise VAE decode")


def _old_vae_keys(state: dict) -> dict:
    """New diffusers VAE attention names → the old ones, with 1×1-conv-shaped weights."""
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    out = {}
    for key, value in state.items():
        for new, old in renames.items():
            if f".attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
                if key.endswith("weight"):
                    value = value[:, :, None, None]
        out[key] = value.contiguous()
    return out


@pytest.mark.parametrize("key_scheme", ["new", "old"])
def test_vae_matches_diffusers(torch_vae, tmp_path, key_scheme):
    from safetensors.torch import save_file

    model, folder = torch_vae
    if key_scheme == "old":
        state = _old_vae_keys(model.state_dict())
        assert any(".query.weight" in k for k in state) and state  # the rename did happen
        save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
        with open(os.path.join(folder, "config.json")) as src, open(tmp_path / "config.json", "w") as dst:
            dst.write(src.read())
        folder = str(tmp_path)
    module, params = load_component(folder, "vae")
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    latent = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
    with torch.no_grad():
        dist = model.encode(torch.from_numpy(image)).latent_dist
        decoded = model.decode(torch.from_numpy(latent)).sample.numpy()
    post = jax.jit(partial(module.apply, method="encode"))(
        {"params": params}, nchw_to_nhwc(jnp.asarray(image))
    )
    ours_dec = jax.jit(partial(module.apply, method="decode"))(
        {"params": params}, nchw_to_nhwc(jnp.asarray(latent))
    )
    assert_close(nhwc_to_nchw(post.mean), dist.mean.numpy(), 1e-4, "VAE posterior mean")
    assert_close(nhwc_to_nchw(post.logvar), dist.logvar.numpy(), 1e-4, "VAE posterior logvar")
    assert_close(nhwc_to_nchw(ours_dec), decoded, 1e-4, "VAE decode")


@pytest.mark.parametrize(
    "act, eos, attention_impl", [("quick_gelu", 2, "auto"), ("gelu", 999, "auto"), ("gelu", 999, "blockwise")]
)
def test_clip_text_matches_transformers(tmp_path, act, eos, attention_impl, monkeypatch):
    from transformers import CLIPTextConfig, CLIPTextModel

    monkeypatch.setattr(attention, "BLOCKWISE_BLOCK_SIZES", SMALL_TILES)  # causal over several tiles

    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=act,
        bos_token_id=998,
        eos_token_id=eos,
        pad_token_id=1,
    )
    model = perturb_torch_(CLIPTextModel(config), seed=3)
    model.save_pretrained(str(tmp_path))
    module, params = load_component(str(tmp_path), "text_encoder", attention_impl=attention_impl)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 990, (3, 77))
    ids[:, 0] = 998
    for row, length in enumerate((5, 20, 76)):
        ids[row, length] = 999 if eos != 2 else 2
        ids[row, length + 1 :] = 1  # padding after the end token
    if eos == 2:  # legacy: pooled output at the largest id, make it the end token
        ids = np.where(ids >= 990, 989, ids)
        ids[:, 0] = 0
        for row, length in enumerate((5, 20, 76)):
            ids[row, length] = 995
    with torch.no_grad():
        ref = model(torch.from_numpy(ids))
    hidden, pooled = jax.jit(module.apply)({"params": params}, jnp.asarray(ids, jnp.int32))
    assert_close(hidden, ref.last_hidden_state.numpy(), 1e-4, "CLIP last hidden state")
    assert_close(pooled, ref.pooler_output.numpy(), 1e-4, "CLIP pooled output")


def test_clip_drops_position_ids_buffer(tmp_path):
    """Old transformers checkpoints carry ``text_model.embeddings.position_ids``."""
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=100,
        hidden_size=16,
        intermediate_size=20,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
    )
    model = CLIPTextModel(config)
    model.save_pretrained(str(tmp_path))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(state, str(tmp_path / "model.safetensors"))
    _, params = load_component(str(tmp_path), "text_encoder")
    assert "position_ids" not in str(jax.tree_util.tree_structure(params))


def test_msgpack_and_safetensors_give_identical_trees(torch_unet, tmp_path):
    module, params = load_component(torch_unet[1], "unet")
    save_component(str(tmp_path), "unet", module, params, fmt="msgpack")
    from_msgpack = read_msgpack(str(tmp_path / "diffusion_flax_model.msgpack"))
    flat = flatten(params)
    assert from_msgpack.keys() == flat.keys()
    for key, value in flat.items():
        np.testing.assert_array_equal(np.asarray(from_msgpack[key]), value)
    _, reloaded = load_component(str(tmp_path), "unet")
    jax.tree.map(np.testing.assert_array_equal, reloaded, params)
