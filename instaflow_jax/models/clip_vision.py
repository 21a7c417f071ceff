"""transformers ``CLIPModel`` (both towers) in flax.linen, with transformers' parameter names.

The vision tower is a ViT: a bias-free patch convolution, a learned class embedding prepended to the
patch tokens, learned position embeddings, ``pre_layrnorm`` (transformers' spelling), the text
encoder's layers (:mod:`instaflow_jax.models.clip_text`) without the causal mask, and
``post_layernorm`` on the class token (the pooled output). ``CLIPModel`` joins our text transformer
and the vision tower with the bias-free ``text_projection`` / ``visual_projection`` and the scalar
``logit_scale``; its param tree is transformers' ``CLIPModel`` state dict with Flax leaf names::

    text_model/{embeddings, encoder/layers/<i>, final_layer_norm}/...
    vision_model/embeddings/{class_embedding, patch_embedding/kernel, position_embedding/embedding}
    vision_model/{pre_layrnorm, encoder/layers/<i>, post_layernorm}/...
    text_projection/kernel, visual_projection/kernel, logit_scale

Images are NHWC float32 (already resized, cropped and normalised: see
``instaflow_jax.evaluation.clip_score.clip_preprocess``). Features come out in float32 whatever the
compute ``dtype``. Both ``hidden_act="quick_gelu"`` (OpenAI's ViT-L/14) and ``"gelu"`` (LAION's
ViT-g/14) are supported.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from instaflow_jax.models.clip_text import _Encoder, _TextTransformer
from instaflow_jax.models.configs import CLIPTextConfig, CLIPVisionConfig, ConfigError
from instaflow_jax.models.layers import Dtype, layer_norm

__all__ = [
    "CLIPConfig",
    "CLIPModel",
    "CLIPVisionConfig",
    "get_image_features",
    "get_text_features",
]

# transformers' defaults (configuration_clip.py) for keys a CLIPModel config.json leaves out. Ours
# (configs.CLIPTextConfig) are SD 1.x's text encoder, which differ in size and special tokens.
TRANSFORMERS_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "projection_dim": 512,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "pad_token_id": 1,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
}
TRANSFORMERS_VISION_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in dataclasses.fields(CLIPVisionConfig)
}  # ours are transformers'
DEFAULT_PROJECTION_DIM = 512
DEFAULT_LOGIT_SCALE = 2.6592  # log(1 / 0.07)


def _sub_config(raw: dict[str, Any], key: str, defaults: dict[str, Any], cls: type, source: str) -> Any:
    """One of ``text_config`` / ``vision_config`` of a CLIPModel config.json, as transformers reads it.

    Old configs (OpenAI's ViT-L/14) also carry ``<key>_dict``; transformers then fills it with its
    defaults and lets every value of the result win over ``<key>``: so do we. Only the keys our
    dataclass has are read; the rest (dropout, generation settings …) do not change inference.
    """
    sub = raw.get(key) or {}
    legacy = raw.get(f"{key}_dict")
    if not isinstance(sub, dict) or (legacy is not None and not isinstance(legacy, dict)):
        raise ConfigError(f"{source}: {key} must be a JSON object.")
    merged = {**defaults, **sub}
    if legacy is not None:
        merged.update({**defaults, **legacy})
    names = {f.name for f in dataclasses.fields(cls)}
    picked = {k: v for k, v in merged.items() if k in names}
    for size_key in ("image_size", "patch_size"):  # transformers also allows [n, n]
        value = picked.get(size_key)
        if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
            picked[size_key] = value[0]
    if isinstance(picked.get("eos_token_id"), list):  # transformers allows a list; pooling needs one
        picked["eos_token_id"] = picked["eos_token_id"][0]
    return cls.from_dict(picked, source=f"{source} ({key})")


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """transformers ``CLIPConfig``: both towers, the projection size and the initial logit scale."""

    text: CLIPTextConfig
    vision: CLIPVisionConfig
    projection_dim: int = DEFAULT_PROJECTION_DIM
    logit_scale_init_value: float = DEFAULT_LOGIT_SCALE

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> CLIPConfig:
        """Read a transformers ``CLIPModel`` ``config.json`` dict (missing keys: transformers' defaults)."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: not a JSON object.")
        architectures = raw.get("architectures") or []
        model_type = raw.get("model_type")
        is_clip = model_type == "clip" or "CLIPModel" in architectures
        if not is_clip or (model_type is not None and model_type != "clip"):
            found = f"model_type={model_type!r}, architectures={architectures!r}"
            raise ConfigError(
                f"{source} does not describe a transformers CLIPModel ({found}); expected "
                "model_type 'clip' with text_config and vision_config. Point at the folder of a "
                "full CLIP model such as openai/clip-vit-large-patch14 or "
                "laion/CLIP-ViT-g-14-laion2B-s12B-b42K (not a text encoder or an open_clip folder)."
            )
        text = _sub_config(raw, "text_config", TRANSFORMERS_TEXT_DEFAULTS, CLIPTextConfig, source)
        vision = _sub_config(raw, "vision_config", TRANSFORMERS_VISION_DEFAULTS, CLIPVisionConfig, source)
        return cls(
            text=text,
            vision=vision,
            projection_dim=int(raw.get("projection_dim", DEFAULT_PROJECTION_DIM)),
            logit_scale_init_value=float(raw.get("logit_scale_init_value", DEFAULT_LOGIT_SCALE)),
        )


class _VisionEmbeddings(nn.Module):
    """[B, S, S, C] → [B, 1 + (S/p)², D]: class token, then patches row by row, plus positions."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        cfg, d, p = self.config, self.dtype, self.param_dtype
        patch = (cfg.patch_size, cfg.patch_size)
        patches = nn.Conv(
            cfg.hidden_size,
            patch,
            strides=patch,
            padding="VALID",
            use_bias=False,
            dtype=d,
            param_dtype=p,
            name="patch_embedding",
        )(pixel_values.astype(d))
        batch = patches.shape[0]
        patches = patches.reshape(batch, -1, cfg.hidden_size)  # (row, column) order, as torch's flatten
        class_embedding = self.param(
            "class_embedding", nn.initializers.normal(cfg.hidden_size**-0.5), (cfg.hidden_size,), p
        )
        cls = jnp.broadcast_to(class_embedding.astype(patches.dtype), (batch, 1, cfg.hidden_size))
        positions = nn.Embed(
            cfg.num_patches + 1, cfg.hidden_size, param_dtype=p, name="position_embedding"
        ).embedding
        return jnp.concatenate([cls, patches], axis=1) + positions[None].astype(patches.dtype)


class _VisionTransformer(nn.Module):
    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = "auto"

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg, d, p = self.config, self.dtype, self.param_dtype
        h = _VisionEmbeddings(cfg, d, p, name="embeddings")(pixel_values).astype(d)
        h = layer_norm(cfg.layer_norm_eps, d, p, "pre_layrnorm")(h)
        h = _Encoder(cfg, d, p, self.attention_impl, name="encoder")(h)
        pooled = layer_norm(cfg.layer_norm_eps, d, p, "post_layernorm")(h[:, 0])
        return h.astype(jnp.float32), pooled.astype(jnp.float32)


def _check_pixels(pixel_values: jax.Array, cfg: CLIPVisionConfig) -> None:
    expected = (cfg.image_size, cfg.image_size, cfg.num_channels)
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
        raise ValueError(
            f"pixel_values must be NHWC [B, {cfg.image_size}, {cfg.image_size}, {cfg.num_channels}] "
            f"(the model's image_size), got shape {tuple(pixel_values.shape)}. Preprocess the "
            "images with evaluation.clip_score.clip_preprocess first."
        )


class CLIPModel(nn.Module):
    """transformers ``CLIPModel``: ``get_image_features`` / ``get_text_features`` give the projected
    (not normalised) embeddings [B, projection_dim] in float32; ``__call__(input_ids, pixel_values)``
    returns (image_embeds, text_embeds, logits_per_image) like transformers' forward, the logits
    being ``exp(logit_scale)`` times the cosine similarities [B_images, B_texts]."""

    config: CLIPConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = "auto"

    def setup(self) -> None:
        cfg, d, p, impl = self.config, self.dtype, self.param_dtype, self.attention_impl
        self.text_model = _TextTransformer(cfg.text, d, p, impl)
        self.vision_model = _VisionTransformer(cfg.vision, d, p, impl)
        dense = lambda: nn.Dense(cfg.projection_dim, use_bias=False, dtype=d, param_dtype=p)
        self.text_projection = dense()
        self.visual_projection = dense()
        self.logit_scale = self.param(
            "logit_scale", nn.initializers.constant(cfg.logit_scale_init_value), (), p
        )

    def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
        _check_pixels(pixel_values, self.config.vision)
        _, pooled = self.vision_model(pixel_values)
        return self.visual_projection(pooled.astype(self.dtype)).astype(jnp.float32)

    def get_text_features(self, input_ids: jax.Array) -> jax.Array:
        limit = self.config.text.max_position_embeddings
        if input_ids.ndim != 2 or input_ids.shape[1] > limit:
            raise ValueError(f"input_ids must be [B, L] with L ≤ {limit}, got shape {input_ids.shape}.")
        _, pooled = self.text_model(input_ids)
        return self.text_projection(pooled.astype(self.dtype)).astype(jnp.float32)

    def __call__(self, input_ids: jax.Array, pixel_values: jax.Array) -> tuple[jax.Array, ...]:
        image_embeds = self.get_image_features(pixel_values)
        text_embeds = self.get_text_features(input_ids)
        unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
        scale = jnp.exp(self.logit_scale.astype(jnp.float32))
        return image_embeds, text_embeds, scale * unit(image_embeds) @ unit(text_embeds).T


def get_image_features(model: CLIPModel, params: Any, pixel_values: jax.Array) -> jax.Array:
    """Projected image embeddings [B, P] (float32) of preprocessed NHWC ``pixel_values``."""
    return model.apply({"params": params}, pixel_values, method=CLIPModel.get_image_features)


def get_text_features(model: CLIPModel, params: Any, input_ids: jax.Array) -> jax.Array:
    """Projected text embeddings [B, P] (float32) of int32 token ids [B, L] (pooled at the EOS
    token by transformers' rule: see ``clip_text._TextTransformer``)."""
    return model.apply({"params": params}, input_ids, method=CLIPModel.get_text_features)
