"""The stages of ``instaflow-toy``, each ``stage_<name>(config, workdir, done) -> summary``, and
``run_toy``, which runs or resumes them in order (a finished stage leaves ``workdir/stages/<name>.json``).

The stage list and what each does: ``main.py`` (the command's help). The verdicts and
``summary.md``: ``summary.py``; the starting folders: ``starts.py``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from instaflow_jax.examples.toy.data import DATASET, ToyShapes
from instaflow_jax.examples.toy.evaluate import evaluate
from instaflow_jax.examples.toy.models import make_toy_pipeline
from instaflow_jax.examples.toy.starts import start_from
from instaflow_jax.examples.toy.summary import check_claims, write_summary
from instaflow_jax.files import write_json_atomic
from instaflow_jax.generate_triplets import generate_triplets
from instaflow_jax.image_io import make_grid, save_png
from instaflow_jax.train.metrics import read_metrics
from instaflow_jax.train.trainer import train_and_evaluate

STAGES = (
    "pipeline",
    "teacher",
    "teacher_triplets",
    "reflow",
    "rf_triplets",
    "distill",
    "distill_lpips",
    "direct",
    "eval",
)


def _path(workdir: str, *parts: str) -> str:
    return os.path.join(workdir, *parts)


def _train(config: Any, workdir: str, name: str, stage: Any, **job: Any) -> dict[str, Any]:
    """One trainer run in ``workdir/name``: batch size, steps, learning rate and EMA from the
    config section ``stage``, the toy's common settings, and the objective's ``job`` keys."""
    steps = job.pop("num_steps", stage.steps)
    optimizer = {
        "learning_rate": stage.learning_rate,
        "warmup_steps": max(1, steps // 20),
        "schedule": "cosine",
        "final_lr_fraction": 0.1,
        "weight_decay": 0.0,
        "clip_norm": 1.0,
    }
    trainer_config = {
        "height": config.image_size,
        "width": config.image_size,
        "batch_size": stage.batch_size,
        "num_steps": steps,
        "optimizer": optimizer,
        "ema_decay": stage.ema_decay,
        "dtype": config.dtype,
        "seed": config.seed,
        "log_every": max(1, steps // 20),
        "checkpoint_every": max(1, steps // config.checkpoints_per_stage),
        "keep_checkpoints": 1,
        "sample": {"every": 0},
        **job,
    }
    result = train_and_evaluate(trainer_config, _path(workdir, name))
    if result.preempted:
        raise SystemExit(
            f"preempted during stage {name} at step {result.step}; run the same command to resume."
        )
    # A run resumed after its last checkpoint trains no step now: take the loss from its log.
    losses = result.losses or {
        r["step"]: r["loss"] for r in read_metrics(_path(workdir, name, "metrics.jsonl"))
    }
    last = max(losses)
    return {"export": result.export_dir, "final_loss": losses[last], "steps": last}


def _triplets(
    config: Any, workdir: str, name: str, model: str, solver: str, steps: int, guidance: float
) -> dict[str, Any]:
    job = {
        "teacher": {
            "model": model,
            "solver": solver,
            "num_steps": steps,
            "guidance_scale": guidance,
            "dtype": config.dtype,
        },
        "prompts": {"kind": "text", "path": _path(workdir, "prompts.txt"), "dedupe": False},
        "output_dir": _path(workdir, name),
        "height": config.image_size,
        "width": config.image_size,
        "seed": config.seed + 1,
        "shard_size": config.triplets.shard_size,
        "per_device_batch": max(1, config.triplets.batch // jax.local_device_count()),
        "latent_dtype": "float32",
    }
    return {"folder": str(generate_triplets(job)), "num": config.triplets.num}


def stage_pipeline(config: Any, workdir: str, done: dict) -> dict[str, Any]:
    folder = make_toy_pipeline(_path(workdir, "base"), config.model, config.image_size, seed=config.seed)
    real = ToyShapes(32, seed=config.seed, height=config.image_size, width=config.image_size).read(
        np.arange(32)
    )
    big = np.repeat(np.repeat(real["images"], 4, axis=1), 4, axis=2)
    save_png(_path(workdir, "data_samples.png"), make_grid(big, columns=8))
    prompts = ToyShapes(config.triplets.num, seed=config.triplets.prompt_seed).read(
        np.arange(config.triplets.num)
    )["prompt"]
    with open(_path(workdir, "prompts.txt"), "w") as f:
        f.write("\n".join(prompts) + "\n")
    return {"folder": folder, "example_prompts": real["prompt"][:8]}


def stage_teacher(config: Any, workdir: str, done: dict) -> dict[str, Any]:
    images = {"kind": "images", "images": DATASET, "seed": config.seed}
    return _train(
        config,
        workdir,
        "teacher",
        config.teacher,
        objective="teacher_pretrain",
        init_from=done["pipeline"]["folder"],  # its UNet is already random (models.py)
        data=images,
        prompt_dropout=config.teacher.prompt_dropout,
        # An ε-prediction UNet samples with DPM-Solver++ (grids are off: ``every`` 0).
        sample={"every": 0, "solver": "dpmpp2m"},
    )


def stage_teacher_triplets(config: Any, workdir: str, done: dict) -> dict[str, Any]:
    t = config.teacher
    return _triplets(
        config, workdir, "triplets_teacher", done["teacher"]["export"], "dpmpp2m", t.solver_steps, t.guidance
    )


def teacher_start(config: Any, workdir: str, done: dict) -> str:
    """Where reflow and direct distillation start: the teacher's export, its output layer
    negated when ``config.init_output_sign`` is −1 (written once, to ``workdir/starts/``; starts.py)."""
    folder = _path(workdir, "starts", "teacher_output_negated")
    return start_from(done["teacher"]["export"], folder, config.init_output_sign)


def stage_reflow(config: Any, workdir: str, done: dict) -> dict[str, Any]:
    data = {"kind": "triplets", "path": done["teacher_triplets"]["folder"], "seed": config.seed}
    return _train(
        config,
        workdir,
        "reflow",
        config.reflow,
        objective="reflow",
        init_from=teacher_start(config, workdir, done),
        data=data,
        prompt_dropout=config.reflow.prompt_dropout,
    )


def stage_rf_triplets(config: Any, workdir: str, done: dict) -> dict[str, Any]:
    r = config.reflow
    return _triplets(
        config, workdir, "triplets_2rf", done["reflow"]["export"], "euler", r.euler_steps, r.guidance
    )


def distill(
    config: Any, workdir: str, name: str, objective: str, init: str, data: str, **extra: Any
) -> dict[str, Any]:
    """One-step distillation (``objective`` "distill" or "direct_distill") in ``workdir/name``
    from the pipeline folder ``init`` on the triplet folder ``data``, with the config's
    ``distill`` section; ``extra`` overrides trainer keys (``num_steps``, ``loss`` …). Returns
    ``{"export", "final_loss", "steps"}``."""
    triplets = {"kind": "triplets", "path": data, "seed": config.seed}
    return _train(
        config,
        workdir,
        name,
        config.distill,
        objective=objective,
        init_from=init,
        data=triplets,
        prompt_dropout=0.0,
        **extra,
    )


def stage_distill(config: Any, workdir: str, done: dict) -> dict[str, Any]:
    return distill(
        config, workdir, "distill", "distill", done["reflow"]["export"], done["rf_triplets"]["folder"]
    )


def stage_distill_lpips(config: Any, workdir: str, done: dict) -> dict[str, Any]:
    from instaflow_jax.train.lpips import resolve_weights

    try:
        resolve_weights(config.lpips.weights_dir or None)
    except FileNotFoundError as err:
        return {"skipped": str(err)}
    return distill(
        config,
        workdir,
        "distill_lpips",
        "distill",
        done["distill"]["export"],
        done["rf_triplets"]["folder"],
        num_steps=config.lpips.steps,
        loss="lpips",
        lpips_weights_dir=config.lpips.weights_dir,
        lpips_resize=config.lpips.resize,
    )


def stage_direct(config: Any, workdir: str, done: dict) -> dict[str, Any]:
    return distill(
        config,
        workdir,
        "direct",
        "direct_distill",
        teacher_start(config, workdir, done),
        done["teacher_triplets"]["folder"],
    )


def stage_eval(config: Any, workdir: str, done: dict) -> dict[str, Any]:
    models = {
        "teacher": done["teacher"]["export"],
        "2rf": done["reflow"]["export"],
        "2rf+distill": done["distill"]["export"],
        "direct distill": done["direct"]["export"],
    }
    if "export" in done.get("distill_lpips", {}):
        models["2rf+distill+lpips"] = done["distill_lpips"]["export"]
    guidance = {name: 0.0 for name in models} | {
        "teacher": config.teacher.guidance,
        "2rf": config.reflow.guidance,
    }
    results = evaluate(workdir, models, config, guidance)
    return {
        "results": os.path.join(workdir, "eval", "results.md"),
        "claims": check_claims(results),
        "distillation_error": {r["model"]: r["rmse"] for r in results.get("distillation_error", [])},
    }


STAGE_FUNCTIONS: dict[str, Callable[[Any, str, dict], dict[str, Any]]] = {
    name: globals()[f"stage_{name}"] for name in STAGES
}


def run_toy(config: Any, workdir: str) -> dict[str, dict[str, Any]]:
    """Run (or resume) every stage; returns each stage's summary (also in ``workdir/stages``)."""
    os.makedirs(_path(workdir, "stages"), exist_ok=True)
    done: dict[str, dict[str, Any]] = {}
    for number, name in enumerate(STAGES, 1):
        marker = _path(workdir, "stages", f"{name}.json")
        if os.path.isfile(marker):
            with open(marker) as f:
                done[name] = json.load(f)
            print(f"[{number}/{len(STAGES)}] {name}: finished earlier, skipped", flush=True)
            continue
        print(f"[{number}/{len(STAGES)}] {name} …", flush=True)
        start = time.perf_counter()
        summary = STAGE_FUNCTIONS[name](config, workdir, done)
        summary["seconds"] = round(time.perf_counter() - start, 1)
        write_json_atomic(marker, summary, indent=1)
        done[name] = summary
        print(f"[{number}/{len(STAGES)}] {name}: done in {summary['seconds']} s", flush=True)
    write_summary(workdir, done)
    return done
