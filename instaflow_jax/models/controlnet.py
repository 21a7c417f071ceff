"""SD 1.x ``ControlNetModel`` in flax.linen with diffusers-Flax parameter names.

A ControlNet is a trainable copy of the UNet's encoder half (time embedding, ``conv_in``, down
blocks, mid block, built from the UNet's own blocks) plus a small convolutional encoder of the
condition image added after ``conv_in``; zero-initialised 1×1 convolutions turn every skip
connection and the mid-block output into residuals that the UNet adds to its own
(``UNet2DConditionModel(..., down_block_additional_residuals, mid_block_additional_residual)``).
It is called with the same float timestep as the UNet (docs/method.md §6).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from instaflow_jax.models.configs import SD1_UNET_BLOCKS_DOWN, ConfigError, _Config
from instaflow_jax.models.layers import Dtype, conv
from instaflow_jax.models.unet import DownBlock, MidBlock, TimestepEmbedding, timestep_embedding


@dataclasses.dataclass(frozen=True)
class ControlNetConfig(_Config):
    """``ControlNetModel`` of SD 1.x (the ``lllyasviel`` ControlNet 1.0/1.1 family), any widths."""

    in_channels: int = 4
    conditioning_channels: int = 3
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    attention_head_dim: int | tuple[int, ...] = 8  # the number of heads, as in UNetConfig
    cross_attention_dim: int = 1280  # diffusers' default; SD 1.x ControlNets store 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    global_pool_conditions: bool = False

    CLASS_NAMES: ClassVar[tuple[str, ...]] = ("ControlNetModel",)
    IGNORED: ClassVar[frozenset[str]] = frozenset({"dropout", "sample_size"})
    FIXED: ClassVar[dict[str, tuple[Any, str]]] = {
        "act_fn": ("silu", "another activation"),
        "mid_block_type": ("UNetMidBlock2DCrossAttn", "another mid block"),
        "only_cross_attention": (False, "cross-attention-only blocks"),
        "downsample_padding": (1, "another downsampler"),
        "mid_block_scale_factor": (1, "a rescaled mid block"),
        "transformer_layers_per_block": (1, "several transformer layers per block, as in SDXL"),
        "encoder_hid_dim": (None, "an encoder projection"),
        "encoder_hid_dim_type": (None, "an encoder projection"),
        "num_attention_heads": (None, "explicit head counts, as in newer models"),
        "use_linear_projection": (False, "linear transformer projections, as in SD 2.x"),
        "class_embed_type": (None, "class embeddings"),
        "addition_embed_type": (None, "added text/time embeddings, as in SDXL"),
        "addition_time_embed_dim": (None, "added time embeddings, as in SDXL"),
        "addition_embed_type_num_heads": (64, "added embeddings"),
        "num_class_embeds": (None, "class embeddings"),
        "upcast_attention": (False, "upcast attention, as in SD 2.1"),
        "resnet_time_scale_shift": ("default", "scale-shift time conditioning"),
        "projection_class_embeddings_input_dim": (None, "class embeddings, as in SDXL"),
    }

    @property
    def num_heads(self) -> tuple[int, ...]:
        heads = self.attention_head_dim
        return tuple(heads) if isinstance(heads, tuple) else (heads,) * len(self.block_out_channels)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    @property
    def condition_downsample(self) -> int:
        """Pixels of the condition image per latent along each side (8 for SD 1.x)."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    @property
    def num_down_residuals(self) -> int:
        """conv_in, every down-block layer and every downsampler (12 for SD 1.x)."""
        n = len(self.block_out_channels)
        return 1 + n * self.layers_per_block + n - 1

    def validate(self, source: str) -> None:
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.num_heads) != n:
            raise ConfigError(
                f"{source}: block_out_channels has {n} entries but down_block_types has "
                f"{len(self.down_block_types)} and attention_head_dim {self.num_heads}."
            )
        for block in self.down_block_types:
            if block not in SD1_UNET_BLOCKS_DOWN:
                raise ConfigError(
                    f"{source}: down block type {block!r} is not an SD 1.x block; expected one of "
                    f"{SD1_UNET_BLOCKS_DOWN}."
                )
        if self.controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            raise ConfigError(
                f"{source}: controlnet_conditioning_channel_order must be 'rgb' or 'bgr', found "
                f"{self.controlnet_conditioning_channel_order!r}."
            )
        if not self.conditioning_embedding_out_channels:
            raise ConfigError(f"{source}: conditioning_embedding_out_channels is empty.")


class ControlNetConditioningEmbedding(nn.Module):
    """Condition image [B, H, W, C] → features [B, H/f, W/f, out_channels] (f = 2^(levels − 1)).

    ``conv_in``, then per level a 3×3 conv and a stride-2 3×3 conv (``blocks_{2i}``,
    ``blocks_{2i+1}``), SiLU after each, then the zero-initialised ``conv_out``.
    """

    out_channels: int
    block_out_channels: tuple[int, ...]
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d, p, widths = self.dtype, self.param_dtype, self.block_out_channels
        h = nn.silu(conv(widths[0], 3, d, p, "conv_in")(x))
        for i in range(len(widths) - 1):
            h = nn.silu(conv(widths[i], 3, d, p, f"blocks_{2 * i}")(h))
            h = nn.silu(conv(widths[i + 1], 3, d, p, f"blocks_{2 * i + 1}", strides=(2, 2))(h))
        return conv(self.out_channels, 3, d, p, "conv_out")(h)


class ControlNetModel(nn.Module):
    """The SD 1.x ControlNet.

    Attributes:
      config: the architecture (any widths, so tiny test configs work).
      dtype: compute dtype of convolutions, matmuls and norms; the time embedding is float32.
      param_dtype: storage dtype of the parameters.
      attention_impl: ``None`` (auto), ``"xla"`` or ``"cudnn"``, as in the UNet.
    """

    config: ControlNetConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array,
        context: jax.Array,
        condition: jax.Array,
        conditioning_scale: jax.Array | float = 1.0,
    ) -> tuple[tuple[jax.Array, ...], jax.Array]:
        """Residuals for the UNet.

        Args:
          sample: [B, h, w, C_in] latents, NHWC (the UNet's input).
          timesteps: float UNet timesteps, scalar or [B] (the UNet's: 1000·(1 − t)).
          context: [B, L, cross_attention_dim] text context (the UNet's).
          condition: [B, h·f, w·f, conditioning_channels] condition image in [0, 1], NHWC, RGB
            (f = 8 for SD 1.x).
          conditioning_scale: multiplies every residual (traced values are fine).
        Returns:
          (down residuals, one per UNet skip connection [B, h_i, w_i, C_i]; mid residual
          [B, h_min, w_min, C_last]), float32 NHWC (spatially pooled to 1×1 when
          ``global_pool_conditions``).
        """
        cfg, d, p = self.config, self.dtype, self.param_dtype
        batch, height, width = sample.shape[:3]
        f = cfg.condition_downsample
        expected = (batch, height * f, width * f, cfg.conditioning_channels)
        if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
            raise ValueError(f"sample must be NHWC [B, h, w, {cfg.in_channels}], got {sample.shape}.")
        if condition.shape != expected:
            raise ValueError(
                f"condition must be NHWC {expected} ({f}× the latent size, {cfg.conditioning_channels} "
                f"channels), got {condition.shape}."
            )
        if cfg.controlnet_conditioning_channel_order == "bgr":
            condition = condition[..., ::-1]
        t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (batch,))
        temb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = TimestepEmbedding(cfg.time_embed_dim, p, name="time_embedding")(temb)
        context = context.astype(d)
        common = dict(
            groups=cfg.norm_num_groups,
            eps=cfg.norm_eps,
            dtype=d,
            param_dtype=p,
            attention_impl=self.attention_impl,
        )

        h = conv(cfg.block_out_channels[0], 3, d, p, "conv_in")(sample.astype(d))
        h = h + ControlNetConditioningEmbedding(
            cfg.block_out_channels[0],
            cfg.conditioning_embedding_out_channels,
            d,
            p,
            name="controlnet_cond_embedding",
        )(condition.astype(d))
        skips: tuple = (h,)
        last = len(cfg.block_out_channels) - 1
        for i, (width_i, kind) in enumerate(zip(cfg.block_out_channels, cfg.down_block_types)):
            h, new = DownBlock(
                width_i,
                cfg.layers_per_block,
                cfg.num_heads[i],
                with_attention=kind.startswith("CrossAttn"),
                resample=i < last,
                name=f"down_blocks_{i}",
                **common,
            )(h, temb, context)
            skips = skips + new
        h = MidBlock(cfg.block_out_channels[-1], cfg.num_heads[-1], name="mid_block", **common)(
            h, temb, context
        )

        scale = jnp.asarray(conditioning_scale, jnp.float32)
        down = tuple(
            conv(s.shape[-1], 1, d, p, f"controlnet_down_blocks_{i}")(s).astype(jnp.float32) * scale
            for i, s in enumerate(skips)
        )
        mid = conv(h.shape[-1], 1, d, p, "controlnet_mid_block")(h).astype(jnp.float32) * scale
        if cfg.global_pool_conditions:
            down = tuple(r.mean(axis=(1, 2), keepdims=True) for r in down)
            mid = mid.mean(axis=(1, 2), keepdims=True)
        return down, mid
