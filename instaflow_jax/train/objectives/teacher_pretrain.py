"""ε-prediction diffusion training of a teacher, for small experiments without a pretrained SD.

t ~ U{0, …, T−1}, x_t = √ᾱ_t·x1 + √(1−ᾱ_t)·ε, loss ‖ε − ε̂(x_t, t | prompt)‖², with the noise
schedule of the pipeline's scheduler config (the one the DPM-Solver++ teacher samples with) and
prompt dropout for CFG.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from instaflow_jax.sampling.dpm_solver import alphas_cumprod
from instaflow_jax.train.objectives.common import LossFn, clean_latents, drop_prompts, frozen_context, mse


def make_teacher_pretrain_loss(
    modules: Mapping[str, Any], scheduler_config: Mapping[str, Any], prompt_dropout: float = 0.1
) -> LossFn:
    unet = modules["unet"]
    alpha_bar = jnp.asarray(alphas_cumprod(scheduler_config))

    def loss(params, frozen, batch, key):
        key_t, key_eps, key_drop = jax.random.split(key, 3)
        x1 = clean_latents(modules, frozen, batch)
        t = jax.random.randint(key_t, (x1.shape[0],), 0, alpha_bar.shape[0])
        eps = jax.random.normal(key_eps, x1.shape, jnp.float32)
        a = alpha_bar[t].reshape(-1, 1, 1, 1)
        x_t = jnp.sqrt(a) * x1 + jnp.sqrt(1.0 - a) * eps
        ids = drop_prompts(key_drop, batch["ids"], frozen["uncond_ids"], prompt_dropout)
        eps_hat = unet.apply(
            {"params": params}, x_t, t.astype(jnp.float32), frozen_context(modules, frozen, ids)
        )
        value = mse(eps, eps_hat)
        return value, {"loss": value}

    return loss
