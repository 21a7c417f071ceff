"""Straightness of a flow (docs/method.md §5).

``S(Z) = ∫_0^1 E ‖(Z1 − Z0) − dZ_t/dt‖² dt``, estimated along an N-step Euler trajectory as the
mean over steps, samples and latent elements of ``((Z_N − Z_0) − v_i)²`` (a per-element mean, so
the value does not grow with the latent size). 0 means every trajectory is a straight line, for
which one Euler step is exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from instaflow_jax.sampling.euler import euler_trajectory
from instaflow_jax.sampling.velocity import Field


def straightness(field: Field, z0: jax.Array, num_steps: int = 25) -> tuple[jax.Array, jax.Array]:
    """Estimate S for the flow of ``field`` from noise ``z0`` [B, h, w, C].

    Returns:
      (S, per_sample): S a float32 scalar, per_sample float32 [B] (mean over steps and elements).
    """
    zs, vs = euler_trajectory(field, z0, num_steps)
    chord = zs[-1] - zs[0]  # [B, ...]
    sq = jnp.square(chord[None] - vs)  # [N, B, ...]
    per_sample = jnp.mean(sq, axis=tuple(i for i in range(sq.ndim) if i != 1))
    return jnp.mean(per_sample), per_sample


def velocity_change(field: Field, z0: jax.Array, num_steps: int = 25) -> jax.Array:
    """Per-step mean squared change of the velocity along the Euler path, float32 [N − 1]."""
    _, vs = euler_trajectory(field, z0, num_steps)
    return jnp.mean(jnp.square(vs[1:] - vs[:-1]), axis=tuple(range(1, vs.ndim)))


def trajectory_straightness(zs: jax.Array, ts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """S of a discretised trajectory with any (increasing) times.

    ``zs`` [N + 1, B, …] states at times ``ts`` [N + 1]; the velocity of segment k is
    ``(z_{k+1} − z_k) / (t_{k+1} − t_k)`` and the chord is ``(z_N − z_0) / (t_N − t_0)``; S is
    the time-weighted mean of their squared difference (per element), normalised by t_N − t_0.
    For an Euler trajectory on uniform times it equals :func:`straightness`.
    Returns (S, per_sample [B]) in float32.
    """
    zs, ts = jnp.asarray(zs, jnp.float32), jnp.asarray(ts, jnp.float32)
    dt = (ts[1:] - ts[:-1]).reshape((-1,) + (1,) * (zs.ndim - 1))
    velocities = (zs[1:] - zs[:-1]) / dt
    chord = (zs[-1] - zs[0]) / (ts[-1] - ts[0])
    sq = jnp.mean(jnp.square(velocities - chord[None]), axis=tuple(range(2, zs.ndim)))  # [N, B]
    per_sample = jnp.sum(sq * dt.reshape(-1, 1), axis=0) / (ts[-1] - ts[0])
    return jnp.mean(per_sample), per_sample


def trajectory_velocity_change(zs: jax.Array, ts: jax.Array) -> jax.Array:
    """Mean squared change between consecutive segment velocities, float32 [N − 1]."""
    zs, ts = jnp.asarray(zs, jnp.float32), jnp.asarray(ts, jnp.float32)
    velocities = (zs[1:] - zs[:-1]) / (ts[1:] - ts[:-1]).reshape((-1,) + (1,) * (zs.ndim - 1))
    return jnp.mean(jnp.square(velocities[1:] - velocities[:-1]), axis=tuple(range(1, zs.ndim)))
