"""Text-conditioned reflow → 2-Rectified Flow (docs/method.md §4.2).

t ~ U[t_min, t_max], X_t = t·X1 + (1−t)·X0, loss ‖(X1 − X0) − v(X_t, 1000·(1−t) | prompt)‖²
(mean over elements); prompts are replaced by "" with probability ``prompt_dropout`` so the
unconditional branch is trained and CFG works afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from instaflow_jax.conventions import interpolate, unet_timestep, velocity_target
from instaflow_jax.train.objectives.common import LossFn, drop_prompts, frozen_context, mse


def make_reflow_loss(
    modules: Mapping[str, Any], prompt_dropout: float = 0.1, t_min: float = 0.0, t_max: float = 1.0
) -> LossFn:
    unet = modules["unet"]

    def loss(params, frozen, batch, key):
        key_t, key_drop = jax.random.split(key)
        x0, x1 = batch["x0"], batch["x1"]
        t = jax.random.uniform(key_t, (x0.shape[0],), jnp.float32, t_min, t_max)
        ids = drop_prompts(key_drop, batch["ids"], frozen["uncond_ids"], prompt_dropout)
        context = frozen_context(modules, frozen, ids)
        v = unet.apply({"params": params}, interpolate(x0, x1, t), unet_timestep(t), context)
        value = mse(velocity_target(x0, x1), v)
        return value, {"loss": value, "t_mean": jnp.mean(t)}

    return loss
