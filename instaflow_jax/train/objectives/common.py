"""Pieces shared by the objectives: prompt dropout, frozen text encoding, batch conventions.

Every objective is a pure function ``loss(params, frozen, batch, key) -> (loss, metrics)``:
``params`` is the trained UNet's tree (float32 master weights), ``frozen`` holds what is not
trained (``text_encoder``, ``vae``, ``uncond_ids`` [1, 77] int32, and per objective
``teacher_unet`` / ``lpips``), ``batch`` holds global arrays (``ids`` [B, 77] int32, ``x0`` and
``x1`` [B, h, w, C] float32 model-scale NHWC latents, or ``images`` [B, H, W, 3] in [0, 1]) and
``key`` is this step's PRNG key. Losses and metrics are float32 scalars.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from instaflow_jax.conventions import from_image_range
from instaflow_jax.sampling.text_to_image import encode_text

LossFn = Callable[[Any, Mapping[str, Any], Mapping[str, jax.Array], jax.Array], tuple[jax.Array, dict]]


def drop_prompts(key: jax.Array, ids: jax.Array, uncond_ids: jax.Array, probability: float) -> jax.Array:
    """Replace each row of ``ids`` [B, L] by ``uncond_ids`` [1, L] with ``probability``."""
    if probability <= 0.0:
        return ids
    drop = jax.random.bernoulli(key, probability, (ids.shape[0], 1))
    return jnp.where(drop, uncond_ids, ids)


def frozen_context(modules: Mapping[str, Any], frozen: Mapping[str, Any], ids: jax.Array) -> jax.Array:
    """Text context [B, 77, D] float32 from the frozen text encoder (no gradient)."""
    return jax.lax.stop_gradient(encode_text(modules["text_encoder"], frozen["text_encoder"], ids))


def uncond_context(modules: Mapping[str, Any], frozen: Mapping[str, Any], batch: int) -> jax.Array:
    """Context of the unconditional prompt "" broadcast to [B, 77, D]."""
    context = frozen_context(modules, frozen, frozen["uncond_ids"])
    return jnp.broadcast_to(context, (batch, *context.shape[1:]))


def clean_latents(
    modules: Mapping[str, Any], frozen: Mapping[str, Any], batch: Mapping[str, jax.Array]
) -> jax.Array:
    """``x1`` if present, else the frozen VAE's posterior mean of ``images`` × scaling factor."""
    if "x1" in batch:
        return batch["x1"]
    vae = modules["vae"]
    posterior = vae.apply({"params": frozen["vae"]}, from_image_range(batch["images"]), method="encode")
    return jax.lax.stop_gradient(posterior.mean * vae.config.scaling_factor)


def mse(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)))
