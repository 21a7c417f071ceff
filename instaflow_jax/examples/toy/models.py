"""The small-scale pipeline: pixel-space SD-style UNet, frozen random CLIP text encoder.

The same classes as SD 1.5 (``UNet2DConditionModel``, ``CLIPTextModel``, the CLIP tokenizer)
at a few thousand times less compute; the "VAE" is the identity (pixel space, see
``models/identity_vae.py``). The text encoder stays frozen at its random initialisation, as the
paper freezes CLIP: its features still tell prompts apart and the UNet learns to read them.
"""

from __future__ import annotations

import os
from typing import Any

from instaflow_jax.examples.toy.data import VOCABULARY
from instaflow_jax.models import CLIPTextModel, UNet2DConditionModel, UNetConfig
from instaflow_jax.models.identity_vae import IdentityAutoencoder, IdentityVAEConfig
from instaflow_jax.text import load_tokenizer
from instaflow_jax.weights.pipeline_folder import DEFAULT_SCHEDULER_CONFIG, save_pipeline_parts
from instaflow_jax.weights.tiny import random_params, tiny_clip_config, write_tiny_tokenizer

PROMPT_TOKENS = 16  # "a small yellow triangle at the bottom right" is 10 tokens with start and end


def toy_unet_config(image_size: int, widths: tuple[int, ...], heads: int, text_width: int) -> UNetConfig:
    """Levels of ``widths`` channels; cross-attention on every level below the full resolution."""
    levels = len(widths)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1)
    up = ("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",)
    return UNetConfig(
        sample_size=image_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(widths),
        down_block_types=down,
        up_block_types=up,
        layers_per_block=1,
        attention_head_dim=heads,
        cross_attention_dim=text_width,
        norm_num_groups=8,
    )


def make_toy_pipeline(folder: str, model: Any, image_size: int, seed: int = 0) -> str:
    """Write the untrained toy pipeline (``model``: widths, heads, text_width, text_layers)."""
    vocab_size = write_tiny_tokenizer(os.path.join(folder, "tokenizer"), VOCABULARY, PROMPT_TOKENS)
    text = tiny_clip_config(
        vocab_size,
        hidden_size=model.text_width,
        intermediate_size=2 * model.text_width,
        num_hidden_layers=model.text_layers,
        max_position_embeddings=PROMPT_TOKENS,
        projection_dim=model.text_width,
    )
    unet_config = toy_unet_config(image_size, tuple(model.widths), model.heads, model.text_width)
    modules = {
        "unet": UNet2DConditionModel(unet_config),
        "vae": IdentityAutoencoder(IdentityVAEConfig(channels=3, sample_size=image_size)),
        "text_encoder": CLIPTextModel(text),
    }
    params = {
        "unet": random_params(modules["unet"], "unet", seed),
        "vae": {},
        "text_encoder": random_params(modules["text_encoder"], "text_encoder", seed + 1),
    }
    tokenizer = load_tokenizer(os.path.join(folder, "tokenizer"))
    save_pipeline_parts(folder, modules, params, tokenizer, dict(DEFAULT_SCHEDULER_CONFIG))
    return folder
