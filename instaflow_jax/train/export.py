"""Export a trained UNet as a diffusers pipeline folder (loadable by ``load_pipeline`` and by
PyTorch ``diffusers.StableDiffusionPipeline``), with the frozen VAE, text encoder and tokenizer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from instaflow_jax.weights.pipeline_folder import save_pipeline_parts


def host_copy(tree: Any) -> Any:
    """Global (possibly sharded over hosts) arrays → full numpy copies on every process."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, jax.device_get(tree))
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def export_pipeline(
    folder: str,
    modules: Mapping[str, Any],
    unet_params: Any,
    frozen_params: Mapping[str, Any],
    tokenizer: Any,
    scheduler_config: Mapping[str, Any],
) -> str:
    """Write the pipeline with ``unet_params`` (float32) as its UNet; returns ``folder``."""
    params = {
        "unet": jax.tree.map(lambda x: np.asarray(x, np.float32), host_copy(unet_params)),
        "vae": host_copy(frozen_params["vae"]),
        "text_encoder": host_copy(frozen_params["text_encoder"]),
    }
    if jax.process_index() == 0:
        save_pipeline_parts(folder, dict(modules), params, tokenizer, dict(scheduler_config))
    return folder
