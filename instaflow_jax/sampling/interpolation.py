"""Spherical interpolation between noises, for smooth latent walks (docs/method.md §6)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from instaflow_jax.conventions import nhwc_to_nchw
from instaflow_jax.sampling.noise import initial_noise


def slerp(a: jax.Array, b: jax.Array, alpha: jax.Array | float, eps: float = 1e-7) -> jax.Array:
    """Spherical interpolation per sample between ``a`` and ``b`` (same shape [B, ...]).

    ``alpha`` is a scalar in [0, 1]; 0 gives ``a``, 1 gives ``b``. The angle is measured on the
    flattened sample; nearly parallel inputs fall back to linear interpolation.
    """
    a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
    axes = tuple(range(1, a.ndim))
    cos = jnp.sum(a32 * b32, axes, keepdims=True) / (
        jnp.linalg.norm(a32.reshape(a.shape[0], -1), axis=1).reshape((-1,) + (1,) * (a.ndim - 1))
        * jnp.linalg.norm(b32.reshape(b.shape[0], -1), axis=1).reshape((-1,) + (1,) * (a.ndim - 1))
    )
    theta = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
    sin = jnp.sin(theta)
    parallel = sin < eps
    safe_sin = jnp.where(parallel, 1.0, sin)
    wa = jnp.where(parallel, 1.0 - alpha, jnp.sin((1.0 - alpha) * theta) / safe_sin)
    wb = jnp.where(parallel, alpha, jnp.sin(alpha * theta) / safe_sin)
    return wa * a32 + wb * b32


def slerp_path(a: jax.Array, b: jax.Array, num_frames: int) -> jax.Array:
    """``num_frames`` points from ``a`` to ``b`` inclusive: [num_frames, B, ...] float32."""
    alphas = jnp.linspace(0.0, 1.0, num_frames)
    return jax.vmap(lambda t: slerp(a, b, t))(alphas)


def interpolation_latents(seed_a: int, seed_b: int, shape: tuple[int, ...], frames: int) -> np.ndarray:
    """Noise of sample 0 under each seed, slerped: NCHW [frames, C, h, w] float32."""
    a = initial_noise(seed_a, np.arange(1), shape)
    b = initial_noise(seed_b, np.arange(1), shape)
    return nhwc_to_nchw(np.asarray(slerp_path(a, b, frames)[:, 0]))
