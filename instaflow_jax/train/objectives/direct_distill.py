"""Direct distillation: the one-step recipe applied to the SD teacher without reflow.

The paper's baseline (docs/method.md §4): the student starts from SD 1.5 and learns
``D(ODE[SD](X0), X0 + v(X0))`` where ODE[SD] is the teacher's DPM-Solver++ with CFG — from stored
SD triplets (``x1``) or computed online. It is ``distill`` with an ε-prediction teacher.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from instaflow_jax.train.objectives.common import LossFn
from instaflow_jax.train.objectives.distill import make_distill_loss


def make_direct_distill_loss(modules: Mapping[str, Any], teacher: Any = None, **kwargs: Any) -> LossFn:
    if teacher is not None and teacher.solver != "dpmpp2m":
        raise ValueError(
            f"direct distillation distils the SD teacher (ε-prediction, solver dpmpp2m), got solver "
            f"{teacher.solver!r}; use objective 'distill' for a rectified-flow teacher."
        )
    return make_distill_loss(modules, teacher=teacher, **kwargs)
