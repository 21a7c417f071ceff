"""Building blocks shared by the UNet and the VAE (flax.linen, NHWC, diffusers-Flax names).

Numerics follow PyTorch diffusers: exact (erf) gelu in GEGLU, two-pass variance in the norms,
nearest-neighbour upsampling, symmetric padding in UNet downsamplers and (0, 1) padding in VAE
downsamplers. ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype of parameters.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from instaflow_jax.models.attention import dot_product_attention

Dtype = Any


def group_norm(groups: int, eps: float, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.GroupNorm:
    """GroupNorm whose statistics are computed in float32 with a two-pass variance."""
    return nn.GroupNorm(
        num_groups=groups,
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,
        name=name,
    )


def layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False, name=name)


def conv(features: int, kernel: int, dtype: Dtype, param_dtype: Dtype, name: str, **kw) -> nn.Conv:
    """``kernel × kernel`` convolution with PyTorch's "same" padding for stride 1."""
    pad = kernel // 2
    kw.setdefault("padding", ((pad, pad), (pad, pad)))
    return nn.Conv(features, (kernel, kernel), dtype=dtype, param_dtype=param_dtype, name=name, **kw)


def dense(features: int, dtype: Dtype, param_dtype: Dtype, name: str, use_bias: bool = True):
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name)


def nearest_resize(x: jax.Array, height: int, width: int) -> jax.Array:
    """PyTorch ``F.interpolate(mode="nearest")`` on NHWC: source index ``floor(i · in / out)``."""
    _, h, w, _ = x.shape
    if (height, width) == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    rows = (jnp.arange(height) * h) // height
    cols = (jnp.arange(width) * w) // width
    return x[:, rows][:, :, cols]


class ResnetBlock2D(nn.Module):
    """GroupNorm → SiLU → conv → (+ time embedding) → GroupNorm → SiLU → conv, plus shortcut."""

    out_channels: int
    groups: int
    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        d, p = self.dtype, self.param_dtype
        h = nn.silu(group_norm(self.groups, self.eps, d, p, "norm1")(x))
        h = conv(self.out_channels, 3, d, p, "conv1")(h)
        if temb is not None:
            h = h + dense(self.out_channels, d, p, "time_emb_proj")(nn.silu(temb))[:, None, None, :]
        h = nn.silu(group_norm(self.groups, self.eps, d, p, "norm2")(h))
        h = conv(self.out_channels, 3, d, p, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, d, p, "conv_shortcut")(x)
        return x + h


class Downsample2D(nn.Module):
    """Stride-2 3×3 conv named ``conv``. ``vae_padding`` pads (0, 1) like the SD VAE encoder."""

    channels: int
    vae_padding: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        padding = ((0, 1), (0, 1)) if self.vae_padding else ((1, 1), (1, 1))
        return conv(self.channels, 3, self.dtype, self.param_dtype, "conv", strides=(2, 2), padding=padding)(
            x
        )


class Upsample2D(nn.Module):
    """Nearest-neighbour resize (×2, or to ``size``) then a 3×3 conv named ``conv``."""

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
        height, width = size if size is not None else (2 * x.shape[1], 2 * x.shape[2])
        x = nearest_resize(x, height, width)
        return conv(self.channels, 3, self.dtype, self.param_dtype, "conv")(x)


def attend(
    x: jax.Array,
    context: jax.Array,
    heads: int,
    head_dim: int,
    out_dim: int,
    qkv_bias: bool,
    dtype: Dtype,
    param_dtype: Dtype,
    attention_impl: str | None = "auto",
    names: tuple[str, str, str, str] = ("to_q", "to_k", "to_v", "to_out_0"),
) -> jax.Array:
    """Project to q/k/v, attend, project out: ``x`` [B, T, C], ``context`` [B, S, D] → [B, T, out_dim].

    Call it from a ``@nn.compact`` method: the four Dense layers (``names``: q, k, v, out) are
    created in the calling module's scope. diffusers-Flax names them ``to_q/to_k/to_v/to_out_0``
    in the UNet and ``query/key/value/proj_attn`` in the VAE. ``attention_impl`` names the
    implementation of :func:`instaflow_jax.models.attention.dot_product_attention` (default
    ``"auto"``: blockwise or XLA on CPU by size, cuDNN on GPUs in half precision, the Pallas
    kernel on TPUs).
    """
    inner = heads * head_dim
    q = dense(inner, dtype, param_dtype, names[0], qkv_bias)(x)
    k = dense(inner, dtype, param_dtype, names[1], qkv_bias)(context)
    v = dense(inner, dtype, param_dtype, names[2], qkv_bias)(context)
    split = lambda t: t.reshape(t.shape[:2] + (heads, head_dim))
    out = dot_product_attention(split(q), split(k), split(v), implementation=attention_impl)
    return dense(out_dim, dtype, param_dtype, names[3])(out.reshape(out.shape[:2] + (inner,)))


class Attention(nn.Module):
    """Multi-head (cross-)attention without q/k/v bias, as in the UNet transformer blocks."""

    heads: int
    head_dim: int
    out_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        """``x`` [B, T, C], ``context`` [B, S, D] or None (self-attention) → [B, T, out_dim]."""
        context = x if context is None else context
        return attend(
            x,
            context,
            self.heads,
            self.head_dim,
            self.out_dim,
            False,
            self.dtype,
            self.param_dtype,
            self.attention_impl,
        )
