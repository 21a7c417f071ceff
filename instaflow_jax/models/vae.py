"""SD ``AutoencoderKL`` (KL-f8) in flax.linen with diffusers-Flax parameter names (NHWC).

``encode`` returns the diagonal Gaussian posterior of the *unscaled* latent; ``decode`` maps
unscaled latents back to images in [-1, 1]. Latent scaling (× ``scaling_factor``) is the
caller's business, see ``instaflow_jax.conventions``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from instaflow_jax.models.configs import VAEConfig
from instaflow_jax.models.layers import (
    Downsample2D,
    Dtype,
    ResnetBlock2D,
    Upsample2D,
    attend,
    conv,
    group_norm,
)

VAE_NORM_EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)
VAE_ATTENTION_NAMES = ("query", "key", "value", "proj_attn")  # diffusers-Flax VAE names


@dataclasses.dataclass(frozen=True)
class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)); both [B, H/8, W/8, latent_channels] float32, NHWC."""

    mean: jax.Array
    logvar: jax.Array

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        """One reparameterised draw, same shape and dtype as ``mean``."""
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean


jax.tree_util.register_dataclass(DiagonalGaussian, data_fields=["mean", "logvar"], meta_fields=[])


class AttentionBlock(nn.Module):
    """Single-head spatial self-attention: ``group_norm``, q/k/v with bias, residual."""

    groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        y = group_norm(self.groups, VAE_NORM_EPS, self.dtype, self.param_dtype, "group_norm")(x)
        y = y.reshape(b, h * w, c)
        y = attend(
            y, y, 1, c, c, True, self.dtype, self.param_dtype, self.attention_impl, VAE_ATTENTION_NAMES
        )
        return x + y.reshape(b, h, w, c)


class MidBlock2D(nn.Module):
    """``UNetMidBlock2D``: resnet, attention, resnet (no time embedding)."""

    channels: int
    groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = "auto"

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        d, p, c, g = self.dtype, self.param_dtype, self.channels, self.groups
        h = ResnetBlock2D(c, g, VAE_NORM_EPS, d, p, name="resnets_0")(h)
        h = AttentionBlock(g, d, p, self.attention_impl, name="attentions_0")(h)
        return ResnetBlock2D(c, g, VAE_NORM_EPS, d, p, name="resnets_1")(h)


class Encoder(nn.Module):
    """Image [B, H, W, 3] in [-1, 1] → moments [B, H/f, W/f, 2·latent_channels]."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, d, p, g = self.config, self.dtype, self.param_dtype, self.config.norm_num_groups
        h = conv(cfg.block_out_channels[0], 3, d, p, "conv_in")(x.astype(d))
        last = len(cfg.block_out_channels) - 1
        for i, width in enumerate(cfg.block_out_channels):
            resample = "down" if i < last else None
            h = _ResnetStack(width, cfg.layers_per_block, g, resample, d, p, name=f"down_blocks_{i}")(h)
        h = MidBlock2D(cfg.block_out_channels[-1], g, d, p, self.attention_impl, name="mid_block")(h)
        h = nn.silu(group_norm(g, VAE_NORM_EPS, d, p, "conv_norm_out")(h))
        return conv(2 * cfg.latent_channels, 3, d, p, "conv_out")(h)


class _ResnetStack(nn.Module):
    """``DownEncoderBlock2D`` / ``UpDecoderBlock2D``: resnets, then a down- or upsampler."""

    out_channels: int
    num_layers: int
    groups: int
    resample: str | None  # "down", "up" or None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        d, p = self.dtype, self.param_dtype
        for j in range(self.num_layers):
            h = ResnetBlock2D(self.out_channels, self.groups, VAE_NORM_EPS, d, p, name=f"resnets_{j}")(h)
        if self.resample == "down":
            h = Downsample2D(self.out_channels, True, d, p, name="downsamplers_0")(h)
        elif self.resample == "up":
            h = Upsample2D(self.out_channels, d, p, name="upsamplers_0")(h)
        return h


class Decoder(nn.Module):
    """Unscaled latent [B, h, w, latent_channels] → image [B, h·f, w·f, 3] (roughly [-1, 1])."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = "auto"

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg, d, p, g = self.config, self.dtype, self.param_dtype, self.config.norm_num_groups
        h = conv(cfg.block_out_channels[-1], 3, d, p, "conv_in")(z.astype(d))
        h = MidBlock2D(cfg.block_out_channels[-1], g, d, p, self.attention_impl, name="mid_block")(h)
        last = len(cfg.block_out_channels) - 1
        for i, width in enumerate(reversed(cfg.block_out_channels)):
            resample = "up" if i < last else None
            h = _ResnetStack(width, cfg.layers_per_block + 1, g, resample, d, p, name=f"up_blocks_{i}")(h)
        h = nn.silu(group_norm(g, VAE_NORM_EPS, d, p, "conv_norm_out")(h))
        return conv(cfg.out_channels, 3, d, p, "conv_out")(h)


class AutoencoderKL(nn.Module):
    """The SD VAE. Use ``apply(params, x, method="encode")`` / ``method="decode"``.

    ``attention_impl`` names the implementation of the mid-block attention (one head of 512 over
    (H/8)·(W/8) tokens; :mod:`instaflow_jax.models.attention`): the default ``"auto"`` runs it
    blockwise on CPU and GPU at 512² (its float32 scores are 64 MiB per image; cuDNN does not
    take a 512-wide head) and with the Pallas kernel on TPU.

    ``__call__`` (used for init) encodes, takes the posterior mode and decodes.
    """

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = "auto"

    def setup(self) -> None:
        d, p, impl = self.dtype, self.param_dtype, self.attention_impl
        self.encoder = Encoder(self.config, d, p, impl)
        self.decoder = Decoder(self.config, d, p, impl)
        latent = self.config.latent_channels
        self.quant_conv = conv(2 * latent, 1, d, p, None)
        self.post_quant_conv = conv(latent, 1, d, p, None)

    def encode(self, images: jax.Array) -> DiagonalGaussian:
        """``images`` [B, H, W, in_channels] in [-1, 1], H and W multiples of the downsampling
        factor (8 for SD) → posterior over unscaled latents [B, H/8, W/8, latent_channels]."""
        factor = self.config.downsample_factor
        if images.ndim != 4 or images.shape[-1] != self.config.in_channels:
            raise ValueError(f"images must be NHWC [B, H, W, {self.config.in_channels}], got {images.shape}.")
        if images.shape[1] % factor or images.shape[2] % factor:
            raise ValueError(f"image sides {images.shape[1:3]} must be multiples of {factor}.")
        moments = self.quant_conv(self.encoder(images)).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return DiagonalGaussian(mean, jnp.clip(logvar, *LOGVAR_RANGE))

    def decode(self, latents: jax.Array) -> jax.Array:
        """Unscaled latents [B, h, w, latent_channels] → float32 images [B, 8h, 8w, 3], ~[-1, 1]."""
        if latents.ndim != 4 or latents.shape[-1] != self.config.latent_channels:
            raise ValueError(
                f"latents must be NHWC [B, h, w, {self.config.latent_channels}], got {latents.shape}."
            )
        return self.decoder(self.post_quant_conv(latents.astype(self.dtype))).astype(jnp.float32)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.decode(self.encode(images).mode())
