"""``train_and_evaluate(config, workdir)``: reflow, distillation and teacher pre-training.

One linear trainer (big_vision style): mesh → models → data → state/shardings → checkpoint →
compile → loop (log, checkpoint, sample) → export. The same code runs on one CPU, a multi-GPU
host or a TPU pod: batches are split over the global mesh's data axis (each process reads only
its slice), parameters are replicated or FSDP-sharded (``fsdp``), and ``jax.distributed`` joins
the processes when ``distributed.enabled``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from instaflow_jax.config_utils import to_plain
from instaflow_jax.conventions import latent_shape
from instaflow_jax.data.images import make_image_dataset
from instaflow_jax.data.loader import ShuffledLoader, add_initial_noise
from instaflow_jax.data.prompt_noise import PromptNoiseDataset
from instaflow_jax.data.prompts import load_prompts
from instaflow_jax.data.triplets import TripletDataset
from instaflow_jax.files import ensure_writable_folder
from instaflow_jax.image_io import make_grid, save_png
from instaflow_jax.parallel import (
    barrier,
    batch_sharded,
    enable_compilation_cache,
    global_batch,
    initialize_distributed,
    make_mesh,
    place,
    remat_compiler_options,
    replicated,
    tree_shardings,
)
from instaflow_jax.phases import Phase, phase
from instaflow_jax.progress import progress_bar
from instaflow_jax.sampling.noise import noise_for_indices
from instaflow_jax.sampling.text_to_image import make_generate_fn
from instaflow_jax.text import tokenize
from instaflow_jax.train.checkpoint import Checkpointer, config_differences
from instaflow_jax.train.config import TrainConfig, upgrade_saved_config
from instaflow_jax.train.export import export_pipeline
from instaflow_jax.train.metrics import MetricsWriter, plot_metrics
from instaflow_jax.train.objectives import make_objective
from instaflow_jax.train.preemption import PreemptionWatch
from instaflow_jax.train.state import TrainState, create_state, make_optimizer, train_step
from instaflow_jax.train.tensorboard import TensorBoardWriter, compiled_flops, peak_flops, utilization
from instaflow_jax.weights.folder import load_component
from instaflow_jax.weights.pipeline_folder import PipelineParts, load_pipeline_parts


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite."""


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    workdir: str
    losses: dict[int, float]  # step → loss of every logged step
    export_dir: str | None
    preempted: bool = False  # stopped early on a preemption notice (checkpoint saved)
    step: int = 0  # optimizer steps done when the run returned


def _models(config: TrainConfig) -> PipelineParts:
    """Modules, numpy params, tokenizer and scheduler config of ``init_from`` (student init)."""
    from instaflow_jax.weights.tiny import resolve_model

    return load_pipeline_parts(
        resolve_model(config.init_from),
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        remat=config.remat,
        attention_impl=config.attention,
    )


def _frozen(config: TrainConfig, parts: PipelineParts) -> tuple[dict[str, Any], Any]:
    """What the objective needs but does not train; and the LPIPS module (or None)."""
    frozen = {
        "text_encoder": parts.params["text_encoder"],
        "vae": parts.params["vae"],
        "uncond_ids": tokenize(parts.tokenizer, [""]),
    }
    if config.teacher.model and config.objective in ("distill", "direct_distill"):
        from instaflow_jax.weights.tiny import resolve_model

        teacher_unet, params = load_component(
            os.path.join(resolve_model(config.teacher.model), "unet"), "unet"
        )
        if teacher_unet.config != parts.modules["unet"].config:
            raise ValueError(
                "the teacher's UNet config differs from the student's; both must be SD 1.x UNets alike."
            )
        frozen["teacher_unet"] = params
    lpips_module = None
    if config.loss == "lpips" and config.objective in ("distill", "direct_distill"):
        from instaflow_jax.train.lpips import make_lpips

        lpips_module, frozen["lpips"] = make_lpips(
            config.lpips_weights_dir or None, config.lpips_resize or 64
        )
    return frozen, lpips_module


def _dataset(config: TrainConfig, shape: tuple[int, int, int]) -> tuple[Any, int | None]:
    """The dataset, and the seed X0 is drawn from on device (None: X0 is stored, or unused)."""
    if config.data.kind == "triplets":
        dataset = TripletDataset(config.data.path, regenerate_x0=False, as_float32=False)
        if dataset.latent_shape != shape:
            raise ValueError(
                f"{config.data.path} holds latents {dataset.latent_shape}, the config implies {shape}."
            )
        return dataset, None if dataset.stores_x0 else dataset.manifest["seed"]
    if config.data.kind == "prompts":
        return PromptNoiseDataset(
            load_prompts(config.data.prompts), config.data.seed, shape
        ), config.data.seed
    images = make_image_dataset(
        config.data.images, config.data.num_images, config.data.seed, config.height, config.width
    )
    return images, None


BATCH_ARRAYS = ("x0", "x1", "images")  # what the objectives read besides ids and index


def _host_batch(local: dict[str, Any], tokenizer: Any, lock: threading.Lock) -> dict[str, np.ndarray]:
    """A read batch → the step's host arrays (in the loader's threads): the arrays an objective
    reads (``BATCH_ARRAYS``; a dataset's other columns stay on the host), ``ids`` int32 [k, 77]
    for ``prompt``, and ``index`` uint32 [k], from which X0 is drawn on device."""
    arrays = {k: np.asarray(local[k]) for k in BATCH_ARRAYS if k in local}
    with lock:  # a tokenizers-backed tokenizer must not be called from two threads at once
        arrays["ids"] = tokenize(tokenizer, local["prompt"])
    if "index" in local:
        arrays["index"] = np.asarray(local["index"], np.uint32)
    return arrays


def _on_device(step: Callable, seed: int | None, shape: tuple[int, int, int]) -> Callable:
    """``step(state, frozen, batch)`` that first casts ``x0``/``x1`` (stored dtype) to float32
    and, when ``seed`` is set, adds X0 float32 [B, *shape] drawn from ``batch["index"]``."""

    def prepared(state: Any, frozen: Any, batch: dict[str, jax.Array]) -> Any:
        batch = {k: v.astype(jnp.float32) if k in ("x0", "x1") else v for k, v in batch.items()}
        if seed is not None:
            batch = add_initial_noise(batch, seed, shape)
        return step(state, frozen, batch)

    return prepared


def _sampler(
    config: TrainConfig, parts: PipelineParts, shape: tuple[int, int, int], ema_params: Any, frozen: Any
):
    """``sample(unet_params, frozen) -> images`` for the PNG grids, from fixed prompts and noise.

    Compiled now for the shardings of ``ema_params`` and ``frozen`` (so no process compiles in
    the middle of the loop while the others wait in a collective)."""
    prompts = list(config.sample.prompts)
    spec = config.sample_spec()
    ids = tokenize(parts.tokenizer, prompts)
    uncond = tokenize(parts.tokenizer, [""] * len(prompts)) if spec.cfg else None
    z0 = noise_for_indices(config.sample.seed, np.arange(len(prompts)), shape)
    guidance = jnp.float32(config.sample.guidance_scale)

    def params_of(unet_params, frozen):
        return {"unet": unet_params, "vae": frozen["vae"], "text_encoder": frozen["text_encoder"]}

    generate = (
        jax.jit(make_generate_fn(parts.modules, spec, parts.scheduler_config))
        .lower(params_of(ema_params, frozen), ids, uncond, z0, guidance)
        .compile()
    )

    def sample(unet_params, frozen):
        images = generate(params_of(unet_params, frozen), ids, uncond, z0, guidance)
        return np.asarray(multihost_utils.process_allgather(images, tiled=True))

    return sample


def train_and_evaluate(config: Any, workdir: str) -> TrainResult:
    """Train (or resume) the job of ``config`` in ``workdir``; export the UNet at the end."""
    config = TrainConfig.from_config(config)
    plain_config = to_plain(config)
    # ---------------------------------------------------------------- mesh
    ensure_writable_folder(workdir, "the run folder (--workdir)")
    d = config.distributed
    if d.enabled:
        initialize_distributed(
            d.coordinator_address,
            d.num_processes,
            d.process_id,
            d.cpu_collectives,
            d.initialization_timeout_s,
        )
    mesh = make_mesh(jax.devices())
    lead = jax.process_index() == 0
    enable_compilation_cache()
    # ---------------------------------------------------------------- models
    with phase(f"loading models from {config.init_from}", lead):
        parts = _models(config)
    modules, tokenizer = parts.modules, parts.tokenizer
    vae = modules["vae"]
    shape = latent_shape(
        1, config.height, config.width, vae.config.latent_channels, vae.config.downsample_factor
    )[1:]
    distill = config.objective in ("distill", "direct_distill")
    extras = [
        name for name, on in (("teacher", config.teacher.model), ("LPIPS", config.loss == "lpips")) if on
    ]
    with phase(f"loading {' and '.join(extras)}", lead and distill and bool(extras)):
        frozen_host, lpips_module = _frozen(config, parts)
    loss_fn = make_objective(config, modules, parts.scheduler_config, lpips_module)
    # ---------------------------------------------------------------- input
    dataset, noise_seed = _dataset(config, shape)
    loader = ShuffledLoader(
        dataset,
        config.batch_size,
        seed=config.data.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        transform=functools.partial(_host_batch, tokenizer=tokenizer, lock=threading.Lock()),
    )
    batches = loader.iterator()
    if config.batch_size % mesh.size:
        raise ValueError(f"batch_size {config.batch_size} must be divisible by the {mesh.size} devices.")
    # ---------------------------------------------------------------- state and shardings
    optimizer, schedule = make_optimizer(config.optimizer, config.num_steps)
    abstract = jax.eval_shape(functools.partial(create_state, optimizer=optimizer), parts.params["unet"])
    state_shardings = tree_shardings(abstract, mesh, config.fsdp)
    frozen_shardings = tree_shardings(frozen_host, mesh, config.fsdp)
    frozen = place(frozen_host, frozen_shardings)
    # ---------------------------------------------------------------- checkpoint
    # Hosts load models at different speeds; meet before orbax's first (collective) barrier.
    barrier("models-loaded", d.barrier_timeout_s)
    checkpointer = Checkpointer(
        os.path.join(workdir, "checkpoints"), config.keep_checkpoints, config.checkpoint_every
    )
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_shardings
    )
    with phase("restoring the latest checkpoint", lead and checkpointer.latest_step() is not None):
        restored = checkpointer.restore_latest(target)
    if restored is None:
        unet_params = place(parts.params["unet"], tree_shardings(parts.params["unet"], mesh, config.fsdp))
        state = jax.jit(functools.partial(create_state, optimizer=optimizer), out_shardings=state_shardings)(
            unet_params
        )
        start = 0
    else:
        state, meta, start = restored
        saved = upgrade_saved_config(meta["config"])
        differences = config_differences(saved, plain_config, TrainConfig.RESUMABLE_CHANGES)
        if differences:
            raise ValueError(f"{workdir} was trained with another config: " + "; ".join(differences) + ".")
        if "data" in meta:
            loader.restore(batches, meta["data"])
        else:
            loader.start_at(batches, start)
            if lead:
                print(
                    f"warning: checkpoint step {start} holds no data-iterator state (written before the "
                    "Grain input pipeline): the sample order from here on differs from the first part's.",
                    file=sys.stderr,
                    flush=True,
                )
    del parts.params["unet"]
    # ---------------------------------------------------------------- compile
    step_fn = jax.jit(
        _on_device(
            functools.partial(
                train_step,
                loss_fn=loss_fn,
                optimizer=optimizer,
                schedule=schedule,
                ema_decay=config.ema_decay,
                grad_accum=config.grad_accum,
                seed=config.seed,
            ),
            noise_seed,
            shape,
        ),
        in_shardings=(state_shardings, frozen_shardings, batch_sharded(mesh)),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=(0,),
        compiler_options=remat_compiler_options(config.remat),
    )
    first = global_batch(next(batches), mesh)
    compiling = Phase("compiling train step", lead)
    compiled = step_fn.lower(state, frozen, first).compile()
    compile_s = compiling.done()
    flops, peak = compiled_flops(compiled), peak_flops(jax.devices()[0].device_kind)
    with phase("compiling sampler", lead and config.sample.every > 0) as compiling:
        sample = _sampler(config, parts, shape, state.ema_params, frozen) if config.sample.every > 0 else None
    compile_s += compiling.seconds
    # The first collective runs next: processes that compiled at different speeds meet here.
    barrier("compiled", d.barrier_timeout_s)
    # ---------------------------------------------------------------- loop
    writer = MetricsWriter(workdir, enabled=lead, resume_step=start)
    board = TensorBoardWriter(os.path.join(workdir, "tensorboard"), enabled=lead, resume_step=start)
    board.hparams(plain_config)
    profile = config.profile
    trace_end = profile.start_step + profile.num_steps if lead and profile.num_steps else -1
    losses: dict[int, float] = {}
    progress = progress_bar(
        total=config.num_steps, initial=start, unit="step", disable=not lead, desc="train"
    )
    # step_time counts train steps only: the seconds spent since the last log sampling,
    # checkpointing or writing a trace (``side``, each timed after waiting for the step it follows)
    # are taken out, and logged as sample_s, checkpoint_s and trace_s.
    pending, tick, tick_step, side, tracing = None, time.perf_counter(), start, {}, False
    step, batch, preempted = start, first, False
    with PreemptionWatch(checkpointer) as preemption:
        while step < config.num_steps:
            if step == trace_end - profile.num_steps:
                trace_start = time.perf_counter()
                jax.profiler.start_trace(os.path.join(workdir, "tensorboard"), create_perfetto_trace=True)
                side["trace_s"], tracing = time.perf_counter() - trace_start, True
            state, metrics = compiled(state, frozen, batch)
            if pending is not None:
                _check_finite(*pending, checkpointer)
            pending = (step, metrics)
            done = step + 1
            values = None
            if done % config.log_every == 0 or done == config.num_steps:
                values = {k: local_value(v) for k, v in metrics.items()}  # waits for the step
                _check_finite(step, values, checkpointer)
                elapsed = time.perf_counter() - tick - sum(side.values())
                values["step_time"] = elapsed / max(done - tick_step, 1)
                values["images_per_s"] = config.batch_size / values["step_time"]
                values.update(utilization(flops, values["step_time"], peak))
                values["compile_s"] = compile_s  # train step + sampler, once at start-up
                losses[done] = values["loss"]
                progress.set_postfix(loss=f"{values['loss']:.4g}", lr=f"{values['lr']:.2e}")
            if tracing and done in (trace_end, config.num_steps):
                side["trace_s"] = side.get("trace_s", 0.0) + _stop_trace(state)
                tracing = False
            preempted = preemption.should_stop(done)
            forced = done == config.num_steps or preempted
            if forced or done % config.checkpoint_every == 0:
                _check_finite(step, metrics, checkpointer)  # never checkpoint a non-finite update
            save_start = time.perf_counter()
            if checkpointer.save(done, state, plain_config, force=forced, data=loader.state(batches)):
                side["checkpoint_s"] = side.get("checkpoint_s", 0.0) + time.perf_counter() - save_start
            progress.update(1)
            step = done
            sample_now = sample is not None and (done % config.sample.every == 0 or done == config.num_steps)
            if sample_now and not preempted:
                jax.block_until_ready(state.ema_params)  # the step's own time stays step time
                sample_start = time.perf_counter()
                grid = make_grid(sample(state.ema_params, frozen))
                if lead:
                    save_png(os.path.join(workdir, "samples", f"step_{done:07d}.png"), grid)
                    board.image(done, grid)
                side["sample_s"] = side.get("sample_s", 0.0) + time.perf_counter() - sample_start
            if values is not None:
                values.update(side)
                writer.write(done, values)
                board.scalars(done, values)
                tick, tick_step, side = time.perf_counter(), done, {}
            if preempted:
                break
            if step < config.num_steps:
                batch = global_batch(next(batches), mesh)
    progress.close()
    batches.close()  # stops Grain's read threads
    if tracing:  # preempted inside the traced steps
        _stop_trace(state)
    board.close()
    checkpointer.close()
    if preempted:
        return TrainResult(state, workdir, losses, None, preempted=True, step=step)
    # ---------------------------------------------------------------- export
    export_dir = os.path.join(workdir, "export")
    export_pipeline(
        export_dir,
        modules,
        state.ema_params if config.export_ema else state.params,
        frozen,
        tokenizer,
        parts.scheduler_config,
    )
    if lead:
        plot_metrics(os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "metrics.png"))
    return TrainResult(state, workdir, losses, export_dir, step=step)


def local_value(x: Any) -> float:
    """A replicated scalar's value from this process's own copy (works with several processes)."""
    return float(np.asarray(x.addressable_data(0))) if isinstance(x, jax.Array) else float(x)


def _stop_trace(state: Any) -> float:
    """Wait for the traced steps, stop the ``jax.profiler`` trace (writing it); its seconds."""
    start = time.perf_counter()
    jax.block_until_ready(state)
    jax.profiler.stop_trace()
    return time.perf_counter() - start


def _check_finite(step: int, metrics: Any, checkpointer: Checkpointer) -> None:
    loss, grad_norm = local_value(metrics["loss"]), local_value(metrics["grad_norm"])
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        checkpointer.wait()
        last = checkpointer.latest_step()
        raise NonFiniteLossError(
            f"non-finite loss {loss} or gradient norm {grad_norm} at step {step + 1}. "
            f"The last checkpoint is step {last}; lower the learning rate or check the data, then resume."
        )


__all__ = ["NonFiniteLossError", "TrainResult", "train_and_evaluate"]
