"""Euler solvers of the rectified-flow ODE dZ/dt = v(Z, t), from noise (t = 0) to image (t = 1).

Step i of N evaluates the field at UNet timestep ``1000 · (1 − i/N)`` and updates
``z ← z + v / N`` (docs/method.md §1). Arithmetic is float32 whatever the network's compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from instaflow_jax.conventions import unet_timestep
from instaflow_jax.sampling.velocity import Field


def euler_timesteps(num_steps: int) -> jax.Array:
    """float32 UNet timesteps [N]: 1000, 1000·(1 − 1/N), …, 1000/N."""
    return unet_timestep(jnp.arange(num_steps, dtype=jnp.float32) / num_steps)


def euler_sample(field: Field, z0: jax.Array, num_steps: int) -> jax.Array:
    """Integrate from noise ``z0`` [B, h, w, C] with ``num_steps`` (static) Euler steps → z1."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be ≥ 1, got {num_steps}.")
    if num_steps == 1:
        return one_step(field, z0)
    dt = 1.0 / num_steps
    t_unet = euler_timesteps(num_steps)

    def step(z: jax.Array, t: jax.Array) -> tuple[jax.Array, None]:
        return z + dt * field(z, t).astype(jnp.float32), None

    z1, _ = jax.lax.scan(step, z0.astype(jnp.float32), t_unet)
    return z1


def euler_trajectory(field: Field, z0: jax.Array, num_steps: int) -> tuple[jax.Array, jax.Array]:
    """Like :func:`euler_sample` but also returns the states and velocities.

    Returns:
      zs [N + 1, B, h, w, C] (z0 … zN) and vs [N, B, h, w, C] (the velocity of each step).
    """
    dt = 1.0 / num_steps

    def step(z: jax.Array, t: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        v = field(z, t).astype(jnp.float32)
        return z + dt * v, (z, v)

    z1, (zs, vs) = jax.lax.scan(step, z0.astype(jnp.float32), euler_timesteps(num_steps))
    return jnp.concatenate([zs, z1[None]], axis=0), vs


def one_step(field: Field, z0: jax.Array) -> jax.Array:
    """InstaFlow's one-step generator ``x1 = z0 + v(z0, t_unet = 1000)``."""
    z0 = z0.astype(jnp.float32)
    return z0 + field(z0, jnp.float32(1000.0)).astype(jnp.float32)
