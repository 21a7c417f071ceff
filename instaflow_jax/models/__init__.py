"""Flax ports of the SD 1.x networks (diffusers-Flax parameter names, NHWC compute)."""

from instaflow_jax.models.clip_text import CLIPTextModel
from instaflow_jax.models.configs import (
    CLIPTextConfig,
    ConfigError,
    UNetConfig,
    VAEConfig,
)
from instaflow_jax.models.unet import UNet2DConditionModel
from instaflow_jax.models.vae import AutoencoderKL, DiagonalGaussian

__all__ = [
    "AutoencoderKL",
    "CLIPTextConfig",
    "CLIPTextModel",
    "ConfigError",
    "DiagonalGaussian",
    "UNet2DConditionModel",
    "UNetConfig",
    "VAEConfig",
]
