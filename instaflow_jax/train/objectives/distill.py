"""One-step distillation → InstaFlow (docs/method.md §4.3).

The student is always called at t_unet = 1000: prediction ``X0 + v(X0)``. The target is the
teacher's ODE solution ``ODE[v_teacher](X0)``, either stored (``x1`` of a triplet dataset made by
the teacher) or computed here by the frozen teacher (``frozen["teacher_unet"]``) on the same path
as stored triplets (``sampling.text_to_image``: ``text_field`` then ``solve`` with the teacher's
``TeacherSpec``): N Euler steps with CFG for a rectified-flow teacher, DPM-Solver++ for the SD
teacher. The distance is L2 on latents or LPIPS on VAE-decoded images (gradients flow through the
frozen decoder), optionally resized to bound memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from instaflow_jax.sampling.euler import one_step
from instaflow_jax.sampling.text_to_image import TeacherSpec, decode_latents, make_schedule, solve, text_field
from instaflow_jax.sampling.velocity import unet_field
from instaflow_jax.train.objectives.common import LossFn, drop_prompts, frozen_context, mse, uncond_context


def make_teacher_targets(
    modules: Mapping[str, Any], teacher: TeacherSpec, scheduler_config: Mapping[str, Any] | None = None
):
    """``targets(frozen, context, x0) -> X1`` [B, h, w, C] float32 (no gradient) for ``teacher``;
    the unconditional context is ``frozen["uncond_ids"]``'s (the empty prompt)."""
    if teacher.negative_prompt:
        raise ValueError(
            f"online teacher targets use the empty prompt as the unconditional one, got negative prompt "
            f"{teacher.negative_prompt!r}; store that teacher's triplets with generate_triplets instead."
        )
    spec = teacher.sampler()
    schedule = make_schedule(spec, scheduler_config)

    def targets(frozen, context, x0):
        uncond = uncond_context(modules, frozen, x0.shape[0]) if spec.cfg else None
        field = text_field(modules, {"unet": frozen["teacher_unet"]}, context, uncond, teacher.guidance_scale)
        return jax.lax.stop_gradient(solve(field, x0, spec, schedule))

    return targets


def make_distill_loss(
    modules: Mapping[str, Any],
    loss_kind: str = "l2",
    teacher: TeacherSpec | None = None,
    scheduler_config: Mapping[str, Any] | None = None,
    lpips_module: Any = None,
    lpips_resize: int = 224,
    prompt_dropout: float = 0.0,
) -> LossFn:
    """``teacher`` (a :class:`TeacherSpec`; the trainer passes one when ``teacher.model`` is set)
    enables online targets for batches without x1."""
    unet, vae = modules["unet"], modules["vae"]
    targets = make_teacher_targets(modules, teacher, scheduler_config) if teacher is not None else None
    if loss_kind == "lpips" and lpips_module is None:
        raise ValueError("the LPIPS distillation loss needs the LPIPS module (see train/lpips.py).")

    def decode(frozen, latents):
        images = decode_latents(vae, frozen["vae"], latents, unit_range=False)  # [-1, 1] for LPIPS
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
