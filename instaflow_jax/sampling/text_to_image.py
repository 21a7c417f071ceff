"""Text → latents → images: the one way through (docs/method.md §1–4), as pure functions.

```
ids ─ encode_text ─ context ─┐
noise z0 [B, h, w, C] ───────┴─ text_field (UNet, CFG iff g > 1) ─ solve (spec.solver) ─ latents
latents ─ decode_latents ─ images [B, H, W, 3] in [0, 1]
```

``Pipeline.generate``, the triplet job, the online distillation targets and the trainer's sample
grid all take this path, so a teacher (a :class:`TeacherSpec`) gives the same X1 whether its
triplets are stored or computed during training. ``make_generate_fn`` returns ``fn(params, ids,
uncond_ids, z0, guidance_scale, control=None) -> output`` where everything that changes between
calls (prompts, noise, guidance value, ControlNet images and scales) is a traced argument and
everything that changes the program (steps, solver, CFG on/off, output kind, which ControlNets) is
fixed by the :class:`SamplerSpec`. It composes with ``jax.jit``, ``jax.vmap`` and ``jax.grad``.
All arrays are NHWC float32.
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
from instaflow_jax.sampling.velocity import Field, guidance_enabled, unet_field

SOLVERS = ("euler", "dpmpp2m")
OUTPUTS = ("image", "latent")
__all__ = [
    "OUTPUTS",
    "RECTIFIED_FLOW_TEACHER",
    "SD_TEACHER",
    "SOLVERS",
    "NonFiniteOutputError",
    "SamplerSpec",
    "TeacherSpec",
    "decode_latents",
    "describe_non_finite",
    "encode_text",
    "make_generate_fn",
    "make_schedule",
    "non_finite_leaves",
    "sample_latents",
    "solve",
    "text_field",
    "with_finite_flags",
]


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """The static part of a generation call; each distinct spec compiles once per shape.

    Attributes:
      num_steps: solver steps (1 = InstaFlow one-step).
      solver: "euler" (rectified flow, velocity UNet) or "dpmpp2m" (SD teacher, ε UNet).
      cfg: classifier-free guidance on (two UNet passes per step) — ``guidance_enabled(g)``, i.e. g > 1.
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


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
    """How a teacher turns noise X0 into X1 = ODE[teacher](X0): the same for stored triplets
    (``generate_triplets``) and for targets computed during distillation (``train``).

    The jobs' configs (``generate_triplets.TeacherConfig``, ``train.config.TeacherConfig``) add
    where the weights come from and give their own defaults (see :data:`SD_TEACHER` and
    :data:`RECTIFIED_FLOW_TEACHER`); both turn into this with ``.spec()``.

    Attributes:
      solver: "dpmpp2m" (an ε-prediction SD teacher) or "euler" (a rectified-flow teacher).
      num_steps: solver steps.
      guidance_scale: CFG scale g; CFG runs only when g > 1 (docs/method.md §3).
      negative_prompt: the unconditional prompt under CFG ("" = the empty prompt).
    """

    solver: str
    num_steps: int
    guidance_scale: float
    negative_prompt: str = ""

    def __post_init__(self) -> None:
        self.sampler()  # the solver and step count are checked there

    def sampler(self, output: str = "latent") -> SamplerSpec:
        """The :class:`SamplerSpec` of this teacher (latents out by default)."""
        return SamplerSpec(int(self.num_steps), self.solver, guidance_enabled(self.guidance_scale), output)


# docs/method.md §4.1: SD 1.5's triplets — 25-step DPM-Solver++ with CFG 5 (the triplet job's default).
SD_TEACHER = TeacherSpec(solver="dpmpp2m", num_steps=25, guidance_scale=5.0)
# docs/method.md §4.3: the 2-RF distilled into one step — 25 Euler steps with CFG 1.5 (the online
# distillation targets' default).
RECTIFIED_FLOW_TEACHER = TeacherSpec(solver="euler", num_steps=25, guidance_scale=1.5)


def encode_text(text_encoder: Any, params: Any, ids: jax.Array) -> jax.Array:
    """Token ids [B, 77] int32 → float32 context [B, 77, D] (last hidden state)."""
    hidden, _ = text_encoder.apply({"params": params}, ids)
    return hidden


def decode_latents(vae: Any, params: Any, latents: jax.Array, unit_range: bool = True) -> jax.Array:
    """Model-scale latents [B, h, w, C] → float32 images [B, 8h, 8w, 3] in [0, 1]
    (``unit_range=False``: the VAE's own [-1, 1] range, e.g. for LPIPS)."""
    images = vae.apply({"params": params}, latents / vae.config.scaling_factor, method="decode")
    return to_image_range(images) if unit_range else images


def text_field(
    modules: Mapping[str, Any],
    params: Mapping[str, Any],
    context: jax.Array,
    uncond_context: jax.Array | None,
    guidance_scale: jax.Array | float,
    control: Mapping[str, Any] | None = None,
) -> Field:
    """``params["unet"]`` as a field on text contexts [B, 77, D] (CFG when ``uncond_context`` is
    given), with ControlNets when ``control`` is (see :func:`sample_latents`)."""
    if control is None:
        return unet_field(modules["unet"], params["unet"], context, uncond_context, guidance_scale)
    return controlnet_unet_field(
        modules["unet"],
        params["unet"],
        modules["controlnets"],
        control["params"],
        control["images"],
        control["scales"],
        context,
        uncond_context,
        guidance_scale,
    )


def make_schedule(spec: SamplerSpec, scheduler_config: Mapping[str, Any] | None) -> DPMSolverSchedule | None:
    """The DPM-Solver++ schedule a ``dpmpp2m`` spec needs (None for ``euler``)."""
    if spec.solver == "dpmpp2m":
        return DPMSolverSchedule.create(scheduler_config or {}, spec.num_steps)
    return None


def solve(
    field: Field, z0: jax.Array, spec: SamplerSpec, schedule: DPMSolverSchedule | None = None
) -> jax.Array:
    """Noise [B, h, w, C] → latents [B, h, w, C] float32 with ``spec.solver`` (the one place a
    solver is chosen); ``schedule`` from :func:`make_schedule` for ``dpmpp2m``."""
    if spec.solver == "euler":
        return euler_sample(field, z0, spec.num_steps)
    if schedule is None:
        raise ValueError("the dpmpp2m solver needs a schedule: make_schedule(spec, scheduler_config).")
    return dpm_solver_sample(field, z0, schedule)


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
    text_encoder = modules["text_encoder"]
    if spec.cfg:
        both = encode_text(text_encoder, params["text_encoder"], jnp.concatenate([uncond_ids, ids]))
        uncond, cond = jnp.split(both, 2)
    else:
        uncond, cond = None, encode_text(text_encoder, params["text_encoder"], ids)
    field = text_field(modules, params, cond, uncond, guidance_scale, control)
    return solve(field, z0, spec, schedule)


def make_generate_fn(
    modules: Mapping[str, Any], spec: SamplerSpec, scheduler_config: Mapping[str, Any] | None = None
) -> Callable[..., jax.Array]:
    """``fn(params, ids, uncond_ids, z0, guidance_scale, control=None)`` → images [B, H, W, 3] in
    [0, 1] or latents [B, h, w, C], both float32 NHWC. Pure; jit it with the shardings you need.
    ``modules``/``params`` map ``unet``, ``vae`` and ``text_encoder`` to Flax modules / param
    trees (``Pipeline.modules`` / ``Pipeline.params``); ``control`` is used with
    ``modules["controlnets"]`` (see :func:`sample_latents`)."""
    schedule = make_schedule(spec, scheduler_config)

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
