"""Text → latents → images as one pure function, ready to ``jax.jit`` (the Pipeline's engine).

``make_generate_fn`` returns ``fn(params, ids, uncond_ids, z0, guidance_scale) -> output`` where
everything that changes between calls (prompts, noise, guidance value) is a traced argument and
everything that changes the program (steps, solver, CFG on/off, output kind) is fixed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from instaflow_jax.conventions import to_image_range
from instaflow_jax.sampling.dpm_solver import DPMSolverSchedule, dpm_solver_sample
from instaflow_jax.sampling.euler import euler_sample
from instaflow_jax.sampling.velocity import unet_field

SOLVERS = ("euler", "dpmpp2m")
OUTPUTS = ("image", "latent")


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """The static part of a generation call; each distinct spec compiles once per shape.

    Attributes:
      num_steps: solver steps (1 = InstaFlow one-step).
      solver: "euler" (rectified flow, velocity UNet) or "dpmpp2m" (SD teacher, ε UNet).
      cfg: classifier-free guidance on (two UNet passes per step) — use when g > 1.
      output: "image" (decoded, [0, 1]) or "latent" (model-scale latents).
    """

    num_steps: int = 1
    solver: str = "euler"
    cfg: bool = False
    output: str = "image"

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r}; expected one of {SOLVERS}.")
        if self.output not in OUTPUTS:
            raise ValueError(f"unknown output {self.output!r}; expected one of {OUTPUTS}.")
        if not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {self.num_steps!r}.")


def encode_text(text_encoder: Any, params: Any, ids: jax.Array) -> jax.Array:
    """Token ids [B, 77] int32 → float32 context [B, 77, D] (last hidden state)."""
    hidden, _ = text_encoder.apply({"params": params}, ids)
    return hidden


def decode_latents(vae: Any, params: Any, latents: jax.Array) -> jax.Array:
    """Model-scale latents [B, h, w, C] → float32 images [B, 8h, 8w, 3] in [0, 1]."""
    images = vae.apply({"params": params}, latents / vae.config.scaling_factor, method="decode")
    return to_image_range(images)


def sample_latents(
    modules: Mapping[str, Any],
    params: Mapping[str, Any],
    ids: jax.Array,
    uncond_ids: jax.Array | None,
    z0: jax.Array,
    guidance_scale: jax.Array | float,
    spec: SamplerSpec,
    schedule: DPMSolverSchedule | None = None,
) -> jax.Array:
    """Noise ``z0`` [B, h, w, C] → model-scale latents [B, h, w, C] float32.

    ``uncond_ids`` (negative prompt tokens) is used only when ``spec.cfg``; ``schedule`` only for
    ``spec.solver == "dpmpp2m"``.
    """
    text_encoder, unet = modules["text_encoder"], modules["unet"]
    if spec.cfg:
        both = encode_text(text_encoder, params["text_encoder"], jnp.concatenate([uncond_ids, ids]))
        uncond, cond = jnp.split(both, 2)
        field = unet_field(unet, params["unet"], cond, uncond, guidance_scale)
    else:
        field = unet_field(unet, params["unet"], encode_text(text_encoder, params["text_encoder"], ids))
    if spec.solver == "euler":
        return euler_sample(field, z0, spec.num_steps)
    if schedule is None:
        raise ValueError("the dpmpp2m solver needs a DPMSolverSchedule.")
    return dpm_solver_sample(field, z0, schedule)


def make_generate_fn(
    modules: Mapping[str, Any], spec: SamplerSpec, scheduler_config: Mapping[str, Any] | None = None
) -> Callable[..., jax.Array]:
    """``fn(params, ids, uncond_ids, z0, guidance_scale)`` → images [B, H, W, 3] in [0, 1] or
    latents [B, h, w, C], both float32 NHWC. Pure; jit it with the shardings you need."""
    schedule = None
    if spec.solver == "dpmpp2m":
        schedule = DPMSolverSchedule.create(scheduler_config or {}, spec.num_steps)

    def generate(params, ids, uncond_ids, z0, guidance_scale):
        latents = sample_latents(modules, params, ids, uncond_ids, z0, guidance_scale, spec, schedule)
        if spec.output == "latent":
            return latents
        return decode_latents(modules["vae"], params["vae"], latents)

    return generate
