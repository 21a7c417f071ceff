"""SD 1.x ``UNet2DConditionModel`` in flax.linen with diffusers-Flax parameter names.

The same network is the SD teacher (ε-prediction), the 2-Rectified Flow and the one-step
InstaFlow student (velocity prediction): only the meaning of the output changes.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from instaflow_jax.models.configs import UNetConfig
from instaflow_jax.models.layers import (
    Attention,
    Downsample2D,
    Dtype,
    ResnetBlock2D,
    Upsample2D,
    conv,
    dense,
    group_norm,
    layer_norm,
)

TRANSFORMER_GROUPNORM_EPS = 1e-6
TRANSFORMER_LAYERNORM_EPS = 1e-5


def timestep_embedding(
    timesteps: jax.Array, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0
) -> jax.Array:
    """Sinusoidal embedding of float timesteps [B] → [B, dim], computed in float32.

    Matches diffusers ``get_timestep_embedding`` (max period 10000), for fractional values too.
    """
    half = dim // 2
    exponent = -math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """Two-layer MLP (``linear_1``, SiLU, ``linear_2``) on the sinusoidal embedding, in float32."""

    dim: int
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, emb: jax.Array) -> jax.Array:
        emb = dense(self.dim, jnp.float32, self.param_dtype, "linear_1")(emb)
        return dense(self.dim, jnp.float32, self.param_dtype, "linear_2")(nn.silu(emb))


class GEGLU(nn.Module):
    """``proj`` to 2·inner, split into (hidden, gate), ``hidden · gelu_exact(gate)``."""

    inner_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        hidden, gate = jnp.split(dense(2 * self.inner_dim, self.dtype, self.param_dtype, "proj")(x), 2, -1)
        return hidden * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """GEGLU (``net_0``) then a projection back to ``dim`` (``net_2``)."""

    dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = GEGLU(4 * self.dim, self.dtype, self.param_dtype, name="net_0")(x)
        return dense(self.dim, self.dtype, self.param_dtype, "net_2")(h)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention and GEGLU feed-forward (``ff``), each pre-LayerNorm, residual."""

    dim: int
    heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        d, p, eps = self.dtype, self.param_dtype, TRANSFORMER_LAYERNORM_EPS
        attn = lambda name: Attention(
            self.heads, self.dim // self.heads, self.dim, d, p, self.attention_impl, name=name
        )
        x = x + attn("attn1")(layer_norm(eps, d, p, "norm1")(x))
        x = x + attn("attn2")(layer_norm(eps, d, p, "norm2")(x), context)
        return x + FeedForward(self.dim, d, p, name="ff")(layer_norm(eps, d, p, "norm3")(x))


class Transformer2DModel(nn.Module):
    """GroupNorm → 1×1 ``proj_in`` → transformer block → 1×1 ``proj_out``, residual (NHWC)."""

    channels: int
    heads: int
    groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        d, p = self.dtype, self.param_dtype
        b, h, w, c = x.shape
        y = group_norm(self.groups, TRANSFORMER_GROUPNORM_EPS, d, p, "norm")(x)
        y = conv(self.channels, 1, d, p, "proj_in")(y).reshape(b, h * w, self.channels)
        y = BasicTransformerBlock(
            self.channels, self.heads, d, p, self.attention_impl, name="transformer_blocks_0"
        )(y, context)
        y = conv(c, 1, d, p, "proj_out")(y.reshape(b, h, w, self.channels))
        return x + y


class _UNetBlock(nn.Module):
    """Fields and the resnet(+transformer) layer shared by the down and up blocks."""

    out_channels: int
    num_layers: int
    heads: int
    groups: int
    eps: float
    with_attention: bool  # CrossAttn*Block2D vs plain *Block2D
    resample: bool  # a downsampler (down blocks) or upsampler (up blocks) at the end
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = "auto"

    def layer(self, i: int, h: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        """``resnets_i`` then, in cross-attention blocks, ``attentions_i``."""
        d, p = self.dtype, self.param_dtype
        h = ResnetBlock2D(self.out_channels, self.groups, self.eps, d, p, name=f"resnets_{i}")(h, temb)
        if self.with_attention:
            h = Transformer2DModel(
                self.out_channels, self.heads, self.groups, d, p, self.attention_impl, name=f"attentions_{i}"
            )(h, context)
        return h


class DownBlock(_UNetBlock):
    """``CrossAttnDownBlock2D`` / ``DownBlock2D``; returns (h, its skip outputs)."""

    @nn.compact
    def __call__(self, h: jax.Array, temb: jax.Array, context: jax.Array):
        skips = []
        for i in range(self.num_layers):
            h = self.layer(i, h, temb, context)
            skips.append(h)
        if self.resample:
            h = Downsample2D(self.out_channels, False, self.dtype, self.param_dtype, name="downsamplers_0")(h)
            skips.append(h)
        return h, tuple(skips)


class UpBlock(_UNetBlock):
    """``CrossAttnUpBlock2D`` / ``UpBlock2D``: consumes skips from the end of ``skips``.

    Returns (h, remaining skips). The upsampler resizes to the next skip's spatial size, so
    latents whose sides are not multiples of 2^(levels-1) work as in diffusers.
    """

    @nn.compact
    def __call__(self, h: jax.Array, skips: tuple, temb: jax.Array, context: jax.Array):
        for i in range(self.num_layers):
            h = self.layer(i, jnp.concatenate([h, skips[-1]], axis=-1), temb, context)
            skips = skips[:-1]
        if self.resample:
            size = skips[-1].shape[1:3]
            h = Upsample2D(self.out_channels, self.dtype, self.param_dtype, name="upsamplers_0")(h, size)
        return h, skips


class MidBlock(nn.Module):
    """``UNetMidBlock2DCrossAttn``: resnet, transformer, resnet."""

    channels: int
    heads: int
    groups: int
    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = "auto"

    @nn.compact
    def __call__(self, h: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        d, p = self.dtype, self.param_dtype
        h = ResnetBlock2D(self.channels, self.groups, self.eps, d, p, name="resnets_0")(h, temb)
        h = Transformer2DModel(
            self.channels, self.heads, self.groups, d, p, self.attention_impl, name="attentions_0"
        )(h, context)
        return ResnetBlock2D(self.channels, self.groups, self.eps, d, p, name="resnets_1")(h, temb)


class UNet2DConditionModel(nn.Module):
    """The SD 1.x conditional UNet.

    Attributes:
      config: the architecture (any widths, so tiny test configs work).
      dtype: compute dtype of convolutions, matmuls and norms (e.g. bfloat16). The timestep
        embedding MLP always runs in float32.
      param_dtype: storage dtype of the parameters (float32 for training).
      remat: rematerialise each down/mid/up block in the backward pass (saves memory). On CPU,
        jit with ``compiler_options=parallel.remat_compiler_options(True)``, else XLA:CPU
        merges the recomputation back into the forward pass and nothing is saved.
      attention_impl: ``"auto"`` (default; ``None`` means the same), ``"xla"``, ``"blockwise"``,
        ``"cudnn"`` or ``"pallas_tpu"``, see :mod:`instaflow_jax.models.attention`. ``"auto"`` runs
        the Pallas flash kernel on TPUs, cuDNN's fused attention on GPUs in float16/bfloat16, and
        elsewhere blockwise attention for large score matrices (the self-attention of the 64×64
        and 32×32 latent levels at 512²) and XLA's materialised attention for small ones.
    """

    config: UNetConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    attention_impl: str | None = "auto"

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array,
        context: jax.Array,
        down_block_additional_residuals: tuple[jax.Array, ...] | None = None,
        mid_block_additional_residual: jax.Array | None = None,
    ) -> jax.Array:
        """Predict ε (teacher) or velocity (rectified flow).

        Args:
          sample: [B, H, W, C_in] latents, NHWC, any float dtype.
          timesteps: float UNet timesteps, scalar or [B] (1000.0 = pure noise; fractional OK).
          context: [B, L, cross_attention_dim] text-encoder last hidden states.
          down_block_additional_residuals: optional ControlNet residuals, one per skip connection
            (conv_in output, then every down-block layer and downsampler), NHWC; added to the skips
            as diffusers does.
          mid_block_additional_residual: optional ControlNet residual added to the mid-block output.
        Returns:
          [B, H, W, C_out] float32.
        """
        cfg, d, p = self.config, self.dtype, self.param_dtype
        if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"sample must be NHWC [B, H, W, {cfg.in_channels}], got shape {sample.shape}; "
                "convert diffusers NCHW latents with conventions.nchw_to_nhwc."
            )
        if context.ndim != 3 or context.shape[-1] != cfg.cross_attention_dim:
            raise ValueError(f"context must be [B, L, {cfg.cross_attention_dim}], got shape {context.shape}.")
        batch = sample.shape[0]
        t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (batch,))
        temb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = TimestepEmbedding(cfg.time_embed_dim, p, name="time_embedding")(temb)
        context = context.astype(d)
        block = (lambda cls: nn.remat(cls)) if self.remat else (lambda cls: cls)
        common = dict(
            groups=cfg.norm_num_groups,
            eps=cfg.norm_eps,
            dtype=d,
            param_dtype=p,
            attention_impl=self.attention_impl,
        )

        h = conv(cfg.block_out_channels[0], 3, d, p, "conv_in")(sample.astype(d))
        skips: tuple = (h,)
        last = len(cfg.block_out_channels) - 1
        for i, (width, kind) in enumerate(zip(cfg.block_out_channels, cfg.down_block_types)):
            h, new = block(DownBlock)(
                width,
                cfg.layers_per_block,
                cfg.num_heads[i],
                with_attention=kind.startswith("CrossAttn"),
                resample=i < last,
                name=f"down_blocks_{i}",
                **common,
            )(h, temb, context)
            skips = skips + new
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(
                    f"{len(down_block_additional_residuals)} down-block residuals for {len(skips)} skip "
                    "connections; the ControlNet does not match this UNet's architecture."
                )
            skips = tuple(s + r.astype(d) for s, r in zip(skips, down_block_additional_residuals))

        h = block(MidBlock)(cfg.block_out_channels[-1], cfg.num_heads[-1], name="mid_block", **common)(
            h, temb, context
        )
        if mid_block_additional_residual is not None:
            h = h + mid_block_additional_residual.astype(d)

        heads_up = tuple(reversed(cfg.num_heads))
        for i, (width, kind) in enumerate(zip(reversed(cfg.block_out_channels), cfg.up_block_types)):
            h, skips = block(UpBlock)(
                width,
                cfg.layers_per_block + 1,
                heads_up[i],
                with_attention=kind.startswith("CrossAttn"),
                resample=i < last,
                name=f"up_blocks_{i}",
                **common,
            )(h, skips, temb, context)

        h = nn.silu(group_norm(cfg.norm_num_groups, cfg.norm_eps, d, p, "conv_norm_out")(h))
        return conv(cfg.out_channels, 3, d, p, "conv_out")(h).astype(jnp.float32)
