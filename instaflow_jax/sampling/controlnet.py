"""The UNet with ControlNets as a field ``(z, t_unet) -> v``, with classifier-free guidance.

At every evaluation each ControlNet sees the UNet's input, timestep (``1000·(1 − t)``, docs/method.md
§6) and text context plus its condition image; the residuals of all nets, each times its scale,
are summed (as diffusers' ``MultiControlNetModel`` does) and added to the UNet's skip connections
and mid block. Under CFG the unconditional half gets the same condition images, as in diffusers'
``StableDiffusionControlNetPipeline``; the residuals of globally pooled nets (the shuffle
ControlNet, ``global_pool_conditions``) go to the conditional half only, as that pipeline's guess
mode does for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from instaflow_jax.sampling.velocity import Field, guide


def controlnet_residuals(
    controlnets: Sequence[Any],
    controlnet_params: Sequence[Any],
    conditions: Sequence[jax.Array],
    scales: jax.Array,
    z: jax.Array,
    t: jax.Array,
    context: jax.Array,
    uncond_rows: int = 0,
) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """Summed residuals of several ControlNets: (down residuals, mid residual), float32 NHWC.

    ``conditions[i]`` is net i's image [B, H, W, 3] in [0, 1]; ``scales`` [n] float32. The first
    ``uncond_rows`` rows (the CFG unconditional half) get no residual from globally pooled nets.
    """
    down, mid = None, None
    for i, (net, params, condition) in enumerate(zip(controlnets, controlnet_params, conditions)):
        d, m = net.apply({"params": params}, z, t, context, condition, scales[i])
        if uncond_rows and net.config.global_pool_conditions:
            keep = (jnp.arange(z.shape[0]) >= uncond_rows).astype(jnp.float32)[:, None, None, None]
            d, m = tuple(r * keep for r in d), m * keep
        down = d if down is None else tuple(a + b for a, b in zip(down, d))
        mid = m if mid is None else mid + m
    return down, mid


def controlnet_unet_field(
    unet: Any,
    params: Any,
    controlnets: Sequence[Any],
    controlnet_params: Sequence[Any],
    conditions: Sequence[jax.Array],
    scales: jax.Array,
    context: jax.Array,
    uncond_context: jax.Array | None = None,
    guidance_scale: jax.Array | float = 1.0,
) -> Field:
    """Like :func:`~instaflow_jax.sampling.velocity.unet_field`, with ControlNet residuals.

    Args:
      unet, params: the ``UNet2DConditionModel`` and its params.
      controlnets, controlnet_params: ``ControlNetModel`` modules and their params (one or more).
      conditions: one condition image per net, [B, H, W, 3] float32 in [0, 1], NHWC.
      scales: [n] float32 ``controlnet_scale`` per net (traced).
      context, uncond_context, guidance_scale: as in ``unet_field`` (CFG when ``uncond_context``
        is given; the batch is then [uncond; cond] and the conditions are repeated).
    Returns:
      field(z [B, h, w, C], t_unet scalar or [B]) -> float32 [B, h, w, C].
    """
    if not (len(controlnets) == len(controlnet_params) == len(conditions) >= 1):
        raise ValueError(
            f"need one params tree and one condition per ControlNet: {len(controlnets)} nets, "
            f"{len(controlnet_params)} params, {len(conditions)} conditions."
        )
    scales = jnp.asarray(scales, jnp.float32)

    def apply(z: jax.Array, t_unet: jax.Array, ctx: jax.Array, conds: Sequence[jax.Array], uncond: int = 0):
        t = jnp.broadcast_to(jnp.asarray(t_unet, jnp.float32).reshape(-1), (z.shape[0],))
        down, mid = controlnet_residuals(controlnets, controlnet_params, conds, scales, z, t, ctx, uncond)
        return unet.apply({"params": params}, z, t, ctx, down, mid)

    if uncond_context is None:
        return lambda z, t_unet: apply(z, t_unet, context, conditions)

    both = jnp.concatenate([uncond_context, context], axis=0)
    doubled = [jnp.concatenate([c, c], axis=0) for c in conditions]

    def guided(z: jax.Array, t_unet: jax.Array) -> jax.Array:
        out = apply(jnp.concatenate([z, z], axis=0), t_unet, both, doubled, z.shape[0])
        uncond, cond = jnp.split(out, 2, axis=0)
        return guide(uncond, cond, guidance_scale)

    return guided
