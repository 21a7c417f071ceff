"""Text → latents → images as one pure function, ready to ``jax.jit`` (the Pipeline's engine).

``make_generate_fn`` returns ``fn(params, ids, uncond_ids, z0, guidance_scale, control=None) ->
output`` where everything that changes between calls (prompts, noise, guidance value, ControlNet
images and scales) is a traced argument and everything that changes the program (steps, solver,
CFG on/off, output kind, which ControlNets) is fixed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from instaflow_jax.conventions import to_image_range
from instaflow_jax.sampling.controlnet import controlnet_unet_field
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
    control: Mapping[str, Any] | None = None,
) -> jax.Array:
    """Noise ``z0`` [B, h, w, C] → model-scale latents [B, h, w, C] float32.

    ``uncond_ids`` (negative prompt tokens) is used only when ``spec.cfg``; ``schedule`` only for
    ``spec.solver == "dpmpp2m"``. ``control`` (with ``modules["controlnets"]``) holds the
    ControlNets' ``params`` (a tuple), condition ``images`` (a tuple of [B, H, W, 3] in [0, 1])
    and ``scales`` ([n] float32).
    """
    text_encoder, unet = modules["text_encoder"], modules["unet"]
    if spec.cfg:
        both = encode_text(text_encoder, params["text_encoder"], jnp.concatenate([uncond_ids, ids]))
        uncond, cond = jnp.split(both, 2)
    else:
        uncond, cond = None, encode_text(text_encoder, params["text_encoder"], ids)
    if control is not None:
        field = controlnet_unet_field(
            unet,
            params["unet"],
            modules["controlnets"],
            control["params"],
            control["images"],
            control["scales"],
            cond,
            uncond,
            guidance_scale,
        )
    else:
        field = unet_field(unet, params["unet"], cond, uncond, guidance_scale)
    if spec.solver == "euler":
        return euler_sample(field, z0, spec.num_steps)
    if schedule is None:
        raise ValueError("the dpmpp2m solver needs a DPMSolverSchedule.")
    return dpm_solver_sample(field, z0, schedule)


def make_generate_fn(
    modules: Mapping[str, Any], spec: SamplerSpec, scheduler_config: Mapping[str, Any] | None = None
) -> Callable[..., jax.Array]:
    """``fn(params, ids, uncond_ids, z0, guidance_scale, control=None)`` → images [B, H, W, 3] in
    [0, 1] or latents [B, h, w, C], both float32 NHWC. Pure; jit it with the shardings you need.
    ``control`` is used with ``modules["controlnets"]`` (see :func:`sample_latents`)."""
    schedule = None
    if spec.solver == "dpmpp2m":
        schedule = DPMSolverSchedule.create(scheduler_config or {}, spec.num_steps)

    def generate(params, ids, uncond_ids, z0, guidance_scale, control=None):
        latents = sample_latents(
            modules, params, ids, uncond_ids, z0, guidance_scale, spec, schedule, control
        )
        if spec.output == "latent":
            return latents
        return decode_latents(modules["vae"], params["vae"], latents)

    return generate


class NonFiniteOutputError(ValueError):
    """Generation produced NaN or infinity (bad weights, guidance or step count)."""


def with_finite_flags(fn: Callable[..., jax.Array]) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """``fn`` returning also a bool [B] per-sample "all finite" flag, reduced on device (one
    reduction per batch, fetched with the output: no extra host synchronisation)."""

    def checked(*args, **kwargs):
        out = fn(*args, **kwargs)
        return out, jnp.all(jnp.isfinite(out), axis=tuple(range(1, out.ndim)))

    return checked


def non_finite_leaves(tree: Any, limit: int = 3) -> list[str]:
    """Paths of up to ``limit`` array leaves of ``tree`` holding NaN or infinity (diagnostics)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    bad = []
    for path, leaf in flat:
        if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.inexact) and not bool(jnp.all(jnp.isfinite(leaf))):
            bad.append(jax.tree_util.keystr(path))
            if len(bad) >= limit:
                break
    return bad


def describe_non_finite(
    bad: Any, prompts: list[str], params: Mapping[str, Any], guidance_scale: float, spec: SamplerSpec
) -> str:
    """One message naming the non-finite samples, their prompts and the likely cause.

    (Step counts a DPM-Solver++ schedule cannot represent are refused before anything runs.)"""
    causes = []
    for name in ("unet", "vae", "text_encoder"):
        leaves = non_finite_leaves(params.get(name, {}))
        if leaves:
            causes.append(
                f"the {name} weights hold NaN/inf (e.g. {', '.join(leaves)}): the checkpoint is damaged"
            )
    if spec.cfg and abs(guidance_scale) > 1e4:
        causes.append(f"guidance_scale {guidance_scale:g} is extreme")
    if not causes:
        causes.append("the model itself diverges here (try float32, fewer/more steps or another size)")
    shown = ", ".join(f"{i} ({prompts[i]!r})" for i in list(bad)[:4]) + (" …" if len(bad) > 4 else "")
    return (
        f"generation produced NaN/inf for {len(bad)} of {len(prompts)} samples: {shown}. "
        f"Likely cause: {'; '.join(causes)}."
    )
