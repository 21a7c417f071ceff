"""The InstaFlow conventions (see docs/method.md §1–2): time, UNet timestep, latent scale, layouts.

Every other module imports these instead of re-deriving them.

* Paper time ``t`` runs 0 → 1: ``t = 0`` is Gaussian noise X0, ``t = 1`` is the image latent X1.
* The UNet is fed the float timestep ``1000 * (1 - t)`` (1000.0 at pure noise, never 0).
* The network predicts the velocity ``v ≈ X1 − X0``; an Euler step is ``z ← z + dt · v``.
* Latents are VAE latents × ``scaling_factor`` (0.18215 for SD 1.x); decoded images are mapped
  from [-1, 1] to [0, 1] with ``clip((x + 1) / 2, 0, 1)``.
* Public tensors use the diffusers layout NCHW; Flax models compute in NHWC.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

NUM_TRAIN_TIMESTEPS = 1000.0
SD_LATENT_SCALE = 0.18215
VAE_DOWNSAMPLE = 8


def unet_timestep(t: jnp.ndarray | float) -> jnp.ndarray:
    """Paper time t ∈ [0, 1] (0 = noise) → float32 UNet timestep ``1000 * (1 - t)``."""
    return NUM_TRAIN_TIMESTEPS * (1.0 - jnp.asarray(t, jnp.float32))


def paper_time(t_unet: jnp.ndarray | float) -> jnp.ndarray:
    """Inverse of :func:`unet_timestep`: float32 UNet timestep → paper time t ∈ [0, 1]."""
    return 1.0 - jnp.asarray(t_unet, jnp.float32) / NUM_TRAIN_TIMESTEPS


def interpolate(x0: jnp.ndarray, x1: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    """Straight-line interpolation ``X_t = t·X1 + (1−t)·X0``; ``t`` is [B] and broadcasts."""
    t = jnp.asarray(t, jnp.float32).reshape((-1,) + (1,) * (x0.ndim - 1))
    return t * x1 + (1.0 - t) * x0


def velocity_target(x0: jnp.ndarray, x1: jnp.ndarray) -> jnp.ndarray:
    """The rectified-flow regression target ``X1 − X0``."""
    return x1 - x0


def to_image_range(x: jnp.ndarray) -> jnp.ndarray:
    """VAE output in [-1, 1] → image in [0, 1] (clipped)."""
    return jnp.clip((x + 1.0) / 2.0, 0.0, 1.0)


def from_image_range(x: jnp.ndarray) -> jnp.ndarray:
    """Image in [0, 1] → VAE input in [-1, 1]."""
    return 2.0 * x - 1.0


def nchw_to_nhwc(x):
    """[B, C, H, W] → [B, H, W, C] (numpy or jax array)."""
    return x.transpose(0, 2, 3, 1)


def nhwc_to_nchw(x):
    """[B, H, W, C] → [B, C, H, W] (numpy or jax array)."""
    return x.transpose(0, 3, 1, 2)


def latent_shape(
    batch: int, height: int, width: int, channels: int = 4, factor: int = VAE_DOWNSAMPLE
) -> tuple[int, int, int, int]:
    """NHWC latent shape for images of ``height × width`` pixels and a VAE of downsampling ``factor``."""
    for name, size in (("height", height), ("width", width)):
        if not isinstance(size, (int, np.integer)) or size <= 0 or size % factor:
            nearest = max(factor, int(np.round(float(size) / factor)) * factor)
            raise ValueError(
                f"{name}={size} is not a positive multiple of {factor}; the VAE maps "
                f"{factor}×{factor} pixels to one latent. Use e.g. {nearest}."
            )
    return (batch, height // factor, width // factor, channels)
