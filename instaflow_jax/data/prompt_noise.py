"""Prompts paired with their noise, for distillation with targets computed online by a teacher."""

from __future__ import annotations

from typing import Any

import numpy as np

from instaflow_jax.sampling.noise import noise_for_indices


class PromptNoiseDataset:
    """Sample ``i`` = (prompt ``i``, X0 = noise of ``fold_in(key(seed), i)``), like a triplet
    dataset without X1. ``read`` returns ``x0`` float32 [k, h, w, C], ``prompt`` and ``index``."""

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
        return {
            "x0": np.asarray(noise_for_indices(self.seed, indices, self.latent_shape)),
            "index": indices,
            "prompt": [self.prompts[i] for i in indices],
        }
