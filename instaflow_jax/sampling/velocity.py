"""Velocity (and ε) fields from a UNet, with classifier-free guidance.

A *field* is a function ``field(z, t_unet) -> v`` on NHWC float32 latents ``z`` [B, h, w, C] and a
float32 scalar UNet timestep ``t_unet`` (1000.0 = pure noise, see ``conventions``). Solvers only
see fields, so any JAX function with that signature can be sampled, straightness-measured or
distilled. The constructors below close over params and text contexts; build them inside your
jitted function and they compose with ``jit``, ``vmap`` and ``grad``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Field = Callable[[jax.Array, jax.Array], jax.Array]


def guide(uncond: jax.Array, cond: jax.Array, guidance_scale: jax.Array | float) -> jax.Array:
    """Classifier-free guidance ``uncond + g · (cond − uncond)`` (docs/method.md §3)."""
    return uncond + guidance_scale * (cond - uncond)


def unet_field(
    unet: Any,
    params: Any,
    context: jax.Array,
    uncond_context: jax.Array | None = None,
    guidance_scale: jax.Array | float = 1.0,
) -> Field:
    """The UNet as a field ``(z, t_unet) -> output`` (velocity for RF models, ε for SD).

    Args:
      unet: a ``UNet2DConditionModel``; params: its param tree.
      context: [B, L, D] text context of the prompts.
      uncond_context: [B, L, D] context of the negative prompt (or ""). When given, the UNet runs
        once on the concatenated batch [uncond; cond] and the outputs are combined with
        ``guidance_scale`` (a traced value is fine). When None, a single conditional pass is made;
        callers decide "CFG on iff g > 1" (docs/method.md §3) when they build the field.
    Returns:
      field(z [B, h, w, C], t_unet scalar or [B]) -> float32 [B, h, w, C].
    """

    def apply(z: jax.Array, t_unet: jax.Array, ctx: jax.Array) -> jax.Array:
        t = jnp.broadcast_to(jnp.asarray(t_unet, jnp.float32).reshape(-1), (z.shape[0],))
        return unet.apply({"params": params}, z, t, ctx)

    if uncond_context is None:
        return lambda z, t_unet: apply(z, t_unet, context)

    both = jnp.concatenate([uncond_context, context], axis=0)

    def guided(z: jax.Array, t_unet: jax.Array) -> jax.Array:
        out = apply(jnp.concatenate([z, z], axis=0), t_unet, both)
        uncond, cond = jnp.split(out, 2, axis=0)
        return guide(uncond, cond, guidance_scale)

    return guided


def guidance_enabled(guidance_scale: float) -> bool:
    """CFG is on only for g > 1; otherwise one conditional pass (g = 0 or 1 are the same)."""
    return float(guidance_scale) > 1.0
