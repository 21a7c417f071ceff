"""One-step distillation → InstaFlow (docs/method.md §4.3).

The student is always called at t_unet = 1000: prediction ``X0 + v(X0)``. The target is the
teacher's ODE solution ``ODE[v_teacher](X0)``, either stored (``x1`` of a triplet dataset made by
the teacher) or computed here by the frozen teacher (``frozen["teacher_unet"]``): N Euler steps
with CFG for a rectified-flow teacher, DPM-Solver++ for the SD teacher. The distance is L2 on
latents or LPIPS on VAE-decoded images (gradients flow through the frozen decoder), optionally
resized to bound memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from instaflow_jax.sampling.dpm_solver import DPMSolverSchedule, dpm_solver_sample
from instaflow_jax.sampling.euler import euler_sample, one_step
from instaflow_jax.sampling.velocity import unet_field, use_cfg
from instaflow_jax.train.objectives.common import LossFn, drop_prompts, frozen_context, mse, uncond_context


def make_teacher_targets(
    modules: Mapping[str, Any], teacher: Any, scheduler_config: Mapping[str, Any] | None = None
):
    """``targets(frozen, context, x0) -> X1`` (no gradient) for a ``TeacherConfig``-like spec."""
    unet, cfg = modules["unet"], use_cfg(teacher.guidance_scale)
    schedule = None
    if teacher.solver == "dpmpp2m":
        schedule = DPMSolverSchedule.create(scheduler_config or {}, teacher.num_steps)
    elif teacher.solver != "euler":
        raise ValueError(f"teacher.solver {teacher.solver!r}; expected euler or dpmpp2m.")

    def targets(frozen, context, x0):
        uncond = uncond_context(modules, frozen, x0.shape[0]) if cfg else None
        field = unet_field(unet, frozen["teacher_unet"], context, uncond, teacher.guidance_scale)
        x1 = (
            euler_sample(field, x0, teacher.num_steps)
            if schedule is None
            else dpm_solver_sample(field, x0, schedule)
        )
        return jax.lax.stop_gradient(x1)

    return targets


def make_distill_loss(
    modules: Mapping[str, Any],
    loss_kind: str = "l2",
    teacher: Any = None,
    scheduler_config: Mapping[str, Any] | None = None,
    lpips_module: Any = None,
    lpips_resize: int = 224,
    prompt_dropout: float = 0.0,
) -> LossFn:
    """``teacher`` (a TeacherConfig with a model) enables online targets for batches without x1."""
    unet, vae = modules["unet"], modules["vae"]
    targets = make_teacher_targets(modules, teacher, scheduler_config) if teacher is not None else None
    if loss_kind == "lpips" and lpips_module is None:
        raise ValueError("the LPIPS distillation loss needs the LPIPS module (see train/lpips.py).")

    def decode(frozen, latents):
        images = vae.apply({"params": frozen["vae"]}, latents / vae.config.scaling_factor, method="decode")
        if lpips_resize and images.shape[1:3] != (lpips_resize, lpips_resize):
            images = jax.image.resize(images, (images.shape[0], lpips_resize, lpips_resize, 3), "bilinear")
        return images

    def loss(params, frozen, batch, key):
        ids = drop_prompts(key, batch["ids"], frozen["uncond_ids"], prompt_dropout)
        context = frozen_context(modules, frozen, ids)
        x0 = batch["x0"]
        if "x1" in batch:
            target = batch["x1"]
        elif targets is not None:
            target = targets(frozen, context, x0)
        else:
            raise ValueError("the batch has no x1 and no teacher is configured to compute it.")
        prediction = one_step(unet_field(unet, params, context), x0)
        if loss_kind == "l2":
            value = mse(prediction, target)
        else:
            distance = lpips_module.apply(
                frozen["lpips"], decode(frozen, prediction), jax.lax.stop_gradient(decode(frozen, target))
            )
            value = jnp.mean(distance)
        return value, {"loss": value, "latent_l2": mse(prediction, target)}

    return loss
