"""Flax ports of the SD 1.x networks (diffusers-Flax parameter names, NHWC compute) and of the
evaluation networks (FID's Inception-v3, CLIP's vision tower and projections)."""

from instaflow_jax.models.clip_text import CLIPTextModel
from instaflow_jax.models.clip_vision import CLIPConfig, CLIPModel
from instaflow_jax.models.configs import (
    CLIPTextConfig,
    CLIPVisionConfig,
    ConfigError,
    UNetConfig,
    VAEConfig,
)
from instaflow_jax.models.inception import FIDInceptionV3
from instaflow_jax.models.unet import UNet2DConditionModel
from instaflow_jax.models.vae import AutoencoderKL, DiagonalGaussian

__all__ = [
    "AutoencoderKL",
    "CLIPConfig",
    "CLIPModel",
    "CLIPTextConfig",
    "CLIPTextModel",
    "CLIPVisionConfig",
    "ConfigError",
    "DiagonalGaussian",
    "FIDInceptionV3",
    "UNet2DConditionModel",
    "UNetConfig",
    "VAEConfig",
]
