"""A parameter-free "autoencoder" for pixel-space models (the small-scale reproduction).

It stands where the SD VAE stands, so pipelines, samplers and trainers run unchanged: latents
are the images themselves in [-1, 1] (``scaling_factor`` 1, downsampling factor 1). Its folder
holds only ``config.json`` with ``"_class_name": "IdentityAutoencoder"``; PyTorch diffusers has
no such class, so pixel-space pipelines load with ``instaflow_jax`` only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from instaflow_jax.models.configs import _Config
from instaflow_jax.models.vae import LOGVAR_RANGE, DiagonalGaussian


@dataclasses.dataclass(frozen=True)
class IdentityVAEConfig(_Config):
    channels: int = 3
    sample_size: int = 16
    scaling_factor: float = 1.0

    CLASS_NAMES: ClassVar[tuple[str, ...]] = ("IdentityAutoencoder",)

    @property
    def in_channels(self) -> int:
        return self.channels

    @property
    def out_channels(self) -> int:
        return self.channels

    @property
    def latent_channels(self) -> int:
        return self.channels

    @property
    def downsample_factor(self) -> int:
        return 1


class IdentityAutoencoder(nn.Module):
    """``encode(x)`` = N(x, e^-30), ``decode(z)`` = z; float32 NHWC."""

    config: IdentityVAEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str | None = "auto"

    def encode(self, images: jax.Array) -> DiagonalGaussian:
        images = images.astype(jnp.float32)
        return DiagonalGaussian(images, jnp.full_like(images, LOGVAR_RANGE[0]))

    def decode(self, latents: jax.Array) -> jax.Array:
        return latents.astype(jnp.float32)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.decode(self.encode(images).mode())
