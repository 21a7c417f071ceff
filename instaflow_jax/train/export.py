"""Export a trained UNet as a diffusers pipeline folder (loadable by ``load_pipeline`` and by
PyTorch ``diffusers.StableDiffusionPipeline``), with the frozen VAE, text encoder and tokenizer."""

from __future__ import annotations

import os
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


def export_checkpoint(workdir: str, step: int, out: str, ema: bool = False) -> str:
    """Write checkpoint ``step`` of the run in ``workdir`` as a diffusers folder ``out``.

    The UNet is the step's raw params (or its EMA with ``ema``), verified against the fingerprints
    saved with it; VAE, text encoder, tokenizer and scheduler come from the run's ``init_from``,
    as in the end-of-run export. Returns ``out``.

    Raises:
      FileNotFoundError: no checkpoints in ``workdir``, or no step ``step`` (the message lists
        the saved steps).
      CheckpointError: the step is damaged (its files or metadata cannot be read, or an array
        differs from its fingerprint).
    """
    from instaflow_jax.files import ensure_writable_folder
    from instaflow_jax.parallel import make_mesh, tree_shardings
    from instaflow_jax.train.checkpoint import Checkpointer, CheckpointError
    from instaflow_jax.train.config import TrainConfig, upgrade_saved_config
    from instaflow_jax.train.state import create_state, make_optimizer
    from instaflow_jax.weights.pipeline_folder import load_pipeline_parts
    from instaflow_jax.weights.tiny import resolve_model

    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} does not exist: {workdir} is not a training run folder.")
    checkpointer = Checkpointer(directory)
    try:
        steps = checkpointer.all_steps()
        listed = ", ".join(map(str, steps)) or "none"
        if step not in steps:
            raise FileNotFoundError(f"{directory} has no checkpoint of step {step}; saved steps: {listed}.")
        try:
            meta = checkpointer.read_meta(step)
            config = TrainConfig.from_config(upgrade_saved_config(meta["config"]))
        except Exception as err:
            raise CheckpointError(
                f"checkpoint step {step} in {directory} is damaged: its metadata cannot be read "
                f"({type(err).__name__}); saved steps: {listed}."
            ) from err
        parts = load_pipeline_parts(
            resolve_model(config.init_from),
            dtype=config.dtype,
            param_dtype=config.param_dtype,
            remat=config.remat,
        )
        optimizer, _ = make_optimizer(config.optimizer, config.num_steps)
        abstract = jax.eval_shape(lambda p: create_state(p, optimizer), parts.params["unet"])
        shardings = tree_shardings(abstract, make_mesh(jax.devices()), config.fsdp)
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
        )
        try:
            state, _ = checkpointer.restore(step, target)
        except Exception as err:
            text = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
            raise CheckpointError(
                f"checkpoint step {step} in {directory} is damaged ({type(err).__name__}: {text}); "
                f"saved steps: {listed}."
            ) from err
    finally:
        checkpointer.close()
    ensure_writable_folder(out, "--out")
    return export_pipeline(
        out,
        parts.modules,
        state.ema_params if ema else state.params,
        parts.params,
        parts.tokenizer,
        parts.scheduler_config,
    )
