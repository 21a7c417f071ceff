"""Training objectives (pure loss functions), one module each; ``make_objective`` picks one."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from instaflow_jax.train.objectives.common import LossFn
from instaflow_jax.train.objectives.direct_distill import make_direct_distill_loss
from instaflow_jax.train.objectives.distill import make_distill_loss, make_teacher_targets
from instaflow_jax.train.objectives.reflow import make_reflow_loss
from instaflow_jax.train.objectives.teacher_pretrain import make_teacher_pretrain_loss


def make_objective(
    config: Any, modules: Mapping[str, Any], scheduler_config: Mapping[str, Any], lpips_module: Any = None
) -> LossFn:
    """The loss function of ``config.objective`` (a ``TrainConfig``)."""
    if config.objective == "reflow":
        return make_reflow_loss(modules, config.prompt_dropout, config.t_min, config.t_max)
    if config.objective == "teacher_pretrain":
        return make_teacher_pretrain_loss(modules, scheduler_config, config.prompt_dropout)
    teacher = config.teacher.spec() if config.teacher.model else None
    kwargs = dict(
        loss_kind=config.loss,
        teacher=teacher,
        scheduler_config=scheduler_config,
        lpips_module=lpips_module,
        lpips_resize=config.lpips_resize,
        prompt_dropout=config.prompt_dropout,
    )
    if config.objective == "distill":
        return make_distill_loss(modules, **kwargs)
    if config.objective == "direct_distill":
        return make_direct_distill_loss(modules, **kwargs)
    raise ValueError(f"unknown objective {config.objective!r}.")


__all__ = [
    "LossFn",
    "make_direct_distill_loss",
    "make_distill_loss",
    "make_objective",
    "make_reflow_loss",
    "make_teacher_pretrain_loss",
    "make_teacher_targets",
]
