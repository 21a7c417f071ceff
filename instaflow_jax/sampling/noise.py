"""Initial noise X0 ~ N(0, I) derived from (seed, global sample index).

Sample ``i`` of seed ``s`` is always the same, whatever the batch size, the batch it falls in or
the number of devices: its key is ``fold_in(key(s), i)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MAX_SEED = 2**32 - 1  # seeds are uint32 PRNG seeds


def sample_keys(seed: int | jax.Array, indices: jax.Array) -> jax.Array:
    """Typed PRNG keys [B] for sample ``indices`` [B] (int) under ``seed``."""
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices, jnp.uint32))


def initial_noise(seed: int | jax.Array, indices: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """float32 noise [B, *shape] (NHWC latent ``shape`` = (h, w, C)) for sample ``indices`` [B]."""
    keys = sample_keys(seed, indices)
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)


# Jitted once for everyone (generation, triplet writer and reader), so noise is bit-identical.
noise_for_indices = jax.jit(initial_noise, static_argnums=2)
