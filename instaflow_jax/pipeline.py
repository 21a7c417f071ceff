"""``Pipeline``: tokenizer + Flax UNet/VAE/text encoder + their params, loaded from a folder.

The pure functions in ``instaflow_jax.sampling`` do the work; this object only holds what they
need and offers conveniences on top of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from instaflow_jax.models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel
from instaflow_jax.text import tokenize
from instaflow_jax.weights.pipeline_folder import (
    load_pipeline_parts,
    save_pipeline_parts,
)


@dataclasses.dataclass
class Pipeline:
    """An SD 1.x-family pipeline (SD teacher, 2-Rectified Flow or InstaFlow one-step student).

    ``params`` maps ``"unet"``, ``"vae"`` and ``"text_encoder"`` to Flax param trees.
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: Any
    params: dict[str, Any]
    scheduler_config: dict[str, Any]
    source: str | None = None

    @property
    def latent_scale(self) -> float:
        """VAE ``scaling_factor`` (0.18215 for SD 1.x): model latents = VAE latents × this."""
        return float(self.vae.config.scaling_factor)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along each side (8 for SD 1.x)."""
        return self.vae.config.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def max_length(self) -> int:
        return int(min(self.tokenizer.model_max_length, self.text_encoder.config.max_position_embeddings))

    def tokenize(self, prompts: str | Sequence[str]) -> np.ndarray:
        """Prompts → int32 token ids [B, 77], padded to ``max_length``."""
        return tokenize(self.tokenizer, prompts, self.max_length)

    def encode_prompt(self, prompts: str | Sequence[str]) -> jax.Array:
        """Prompts → float32 text context [B, 77, D] (CLIP last hidden state)."""
        hidden, _ = self.text_encoder.apply({"params": self.params["text_encoder"]}, self.tokenize(prompts))
        return hidden

    def save_pretrained(self, folder: str, fmt: str = "safetensors", dtype: Any = None) -> None:
        """Write the diffusers folder layout (PyTorch-named safetensors by default).

        The folder loads with :func:`load_pipeline` and with PyTorch
        ``diffusers.StableDiffusionPipeline.from_pretrained``.
        """
        save_pipeline_parts(
            folder,
            {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder},
            self.params,
            self.tokenizer,
            self.scheduler_config,
            fmt,
            dtype,
        )


def load_pipeline(
    path: str,
    dtype: Any = "float32",
    param_dtype: Any = "float32",
    variant: str | None = None,
    remat: bool = False,
    attention_impl: str | None = None,
) -> Pipeline:
    """Load an SD 1.x-family diffusers folder (SD 1.5, InstaFlow-0.9B, 2-Rectified Flow …).

    Args:
      path: a local folder with ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/`` and
        ``tokenizer/``, or a Hugging Face repo id already in the local cache.
      dtype: compute dtype (``"bfloat16"`` on accelerators, ``"float32"`` for exact parity).
      param_dtype: dtype the parameters are stored in (``"float32"`` by default).
      variant: weights variant, e.g. ``"fp16"`` for ``*.fp16.safetensors``.
      remat: rematerialise UNet blocks in the backward pass (training).
      attention_impl: ``None`` (auto), ``"xla"`` or ``"cudnn"``.
    """
    parts = load_pipeline_parts(path, dtype, param_dtype, variant, remat=remat, attention_impl=attention_impl)
    modules = parts["modules"]
    return Pipeline(
        unet=modules["unet"],
        vae=modules["vae"],
        text_encoder=modules["text_encoder"],
        tokenizer=parts["tokenizer"],
        params=jax.device_put(parts["params"]),
        scheduler_config=parts["scheduler_config"],
        source=parts["source"],
    )
