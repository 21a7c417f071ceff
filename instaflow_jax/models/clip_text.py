"""transformers ``CLIPTextModel`` in flax.linen with transformers-Flax parameter names.

Param tree: ``text_model/{embeddings, encoder/layers/<i>, final_layer_norm}``, identical to the
former ``FlaxCLIPTextModel``. SD uses the *last hidden state* (after ``final_layer_norm``) as the
UNet's cross-attention context.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from instaflow_jax.models.attention import dot_product_attention
from instaflow_jax.models.configs import CLIPTextConfig, CLIPVisionConfig
from instaflow_jax.models.layers import Dtype, layer_norm


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": lambda x: nn.gelu(x, approximate=False)}


class CLIPAttention(nn.Module):
    config: CLIPTextConfig | CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, d, p = self.config, self.dtype, self.param_dtype
        heads, head_dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        proj = lambda name, t: nn.Dense(cfg.hidden_size, dtype=d, param_dtype=p, name=name)(t)
        split = lambda t: t.reshape(t.shape[:2] + (heads, head_dim))
        q, k, v = (split(proj(n, x)) for n in ("q_proj", "k_proj", "v_proj"))
        causal = cfg.CAUSAL_ATTENTION  # the text encoder's mask; the vision tower has none
        out = dot_product_attention(q, k, v, is_causal=causal, implementation=self.attention_impl)
        return proj("out_proj", out.reshape(x.shape[:2] + (cfg.hidden_size,)))


class CLIPEncoderLayer(nn.Module):
    config: CLIPTextConfig | CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, d, p = self.config, self.dtype, self.param_dtype
        eps = cfg.layer_norm_eps
        x = x + CLIPAttention(cfg, d, p, self.attention_impl, name="self_attn")(
            layer_norm(eps, d, p, "layer_norm1")(x)
        )
        h = layer_norm(eps, d, p, "layer_norm2")(x)
        return x + CLIPMLP(cfg, d, p, name="mlp")(h)


class CLIPMLP(nn.Module):
    config: CLIPTextConfig | CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, d, p = self.config, self.dtype, self.param_dtype
        h = nn.Dense(cfg.intermediate_size, dtype=d, param_dtype=p, name="fc1")(x)
        h = _ACTIVATIONS[cfg.hidden_act](h)
        return nn.Dense(cfg.hidden_size, dtype=d, param_dtype=p, name="fc2")(h)


class _Layers(nn.Module):
    config: CLIPTextConfig | CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.config.num_hidden_layers):
            x = CLIPEncoderLayer(self.config, self.dtype, self.param_dtype, self.attention_impl, name=str(i))(
                x
            )
        return x


class _Encoder(nn.Module):
    config: CLIPTextConfig | CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _Layers(self.config, self.dtype, self.param_dtype, self.attention_impl, name="layers")(x)


class _Embeddings(nn.Module):
    config: CLIPTextConfig
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg = self.config
        tokens = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, param_dtype=self.param_dtype, name="token_embedding"
        )
        positions = nn.Embed(
            cfg.max_position_embeddings,
            cfg.hidden_size,
            param_dtype=self.param_dtype,
            name="position_embedding",
        )
        return tokens(input_ids) + positions(jnp.arange(input_ids.shape[-1])[None, :])


class _TextTransformer(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = "auto"

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg, d, p = self.config, self.dtype, self.param_dtype
        h = _Embeddings(cfg, p, name="embeddings")(input_ids).astype(d)
        h = _Encoder(cfg, d, p, self.attention_impl, name="encoder")(h)
        h = layer_norm(cfg.layer_norm_eps, d, p, "final_layer_norm")(h).astype(jnp.float32)
        if cfg.eos_token_id == 2:  # legacy configs: the EOS token has the largest id
            eos = jnp.argmax(input_ids, axis=-1)
        else:
            eos = jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(h, eos[:, None, None], axis=1)[:, 0]
        return h, pooled


class CLIPTextModel(nn.Module):
    """CLIP text transformer: token ids [B, L] int32 → (last hidden state [B, L, D], pooled [B, D]).

    Both outputs are float32 whatever the compute ``dtype``; L ≤ ``max_position_embeddings`` (77).
    Attention is causal only (SD pipelines pass no padding mask); ``attention_impl`` names its
    implementation (:mod:`instaflow_jax.models.attention`; ``"auto"`` picks XLA for 77 tokens
    except on TPU and on GPUs in half precision, whose fused kernels serve causal attention).
    """

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = "auto"

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        if input_ids.ndim != 2 or input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"input_ids must be [B, L] with L ≤ {self.config.max_position_embeddings}, "
                f"got shape {input_ids.shape}."
            )
        return _TextTransformer(
            self.config, self.dtype, self.param_dtype, self.attention_impl, name="text_model"
        )(input_ids)
