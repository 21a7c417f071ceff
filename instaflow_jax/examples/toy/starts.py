"""The toy's starting points, written once per run folder as ordinary diffusers pipeline folders.

The teacher starts from the base pipeline (``models.make_toy_pipeline``: its UNet is random).
Reflow and direct distillation start from the ε-teacher with its UNet's output layer negated
(``config.init_output_sign = -1``): the UNet then predicts v ≈ −ε̂, the dominant term of the
velocity target X1 − X0 near the noise end. The paper starts from SD as it is and trains 70k+
steps; with a few hundred steps, starting from +ε̂ stalls (docs/toy_results.md). The trainer
just reads the folder (``init_from``): it knows nothing of signs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from instaflow_jax.weights.pipeline_folder import load_pipeline_parts, save_pipeline_parts


def write_with_unet(source: str, folder: str, change: Callable[[dict[str, Any]], dict[str, Any]]) -> str:
    """Write ``folder``: the pipeline ``source`` with UNet params ``change(params)`` (numpy trees),
    everything else (text encoder, VAE, tokenizer, scheduler) as it is. Skipped when ``folder``
    is already complete (its ``model_index.json`` is written last). Returns ``folder``."""
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        return folder
    parts = load_pipeline_parts(source)
    params = dict(parts.params, unet=change(parts.params["unet"]))
    save_pipeline_parts(folder, parts.modules, params, parts.tokenizer, parts.scheduler_config)
    return folder


def negate_output_layer(unet: dict[str, Any]) -> dict[str, Any]:
    """UNet params whose ``conv_out`` kernel and bias are negated (so is the output); the rest as is."""
    head = {name: -np.asarray(value) for name, value in unet["conv_out"].items()}
    return {**unet, "conv_out": head}


def start_from(source: str, folder: str, output_sign: int) -> str:
    """The starting folder for a stage initialised from ``source``: ``source`` itself for
    ``output_sign`` 1, a copy with the output layer negated written to ``folder`` for −1."""
    if output_sign == 1:
        return source
    if output_sign != -1:
        raise ValueError(f"init_output_sign must be 1 or -1, got {output_sign}.")
    return write_with_unet(source, folder, negate_output_layer)
