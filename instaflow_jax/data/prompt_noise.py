"""Prompts paired with their noise, for distillation with targets computed online by a teacher."""

from __future__ import annotations

from typing import Any

import numpy as np


class PromptNoiseDataset:
    """Sample ``i`` = (prompt ``i``, X0 = noise of ``fold_in(key(seed), i)``), like a triplet
    dataset without X1. ``read`` returns ``prompt`` (k strings) and ``index`` (int64 [k]); X0 is
    drawn from ``seed`` and the index inside the jitted step (``loader.add_initial_noise``)."""

    def __init__(self, prompts: list[str], seed: int, latent_shape: tuple[int, int, int]):
        if not prompts:
            raise ValueError("PromptNoiseDataset needs at least one prompt.")
        self.prompts = list(prompts)
        self.seed = seed
        self.latent_shape = tuple(latent_shape)

    def __len__(self) -> int:
        return len(self.prompts)

    def read(self, indices: np.ndarray) -> dict[str, Any]:
        indices = np.asarray(indices, np.int64)
        return {"index": indices, "prompt": [self.prompts[i] for i in indices]}
