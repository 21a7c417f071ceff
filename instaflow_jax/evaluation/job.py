"""``evaluate``: generate for a prompt set, score FID and CLIP score on device, resumably.

One jitted program per batch shape goes prompts → images → (Inception pool features, CLIP cosine)
on every local device (data-parallel, the batch sharded over the mesh); processes take batches
round-robin and write each batch's features to ``OUT/features/`` (``FeatureShards``), so a killed
run resumes with the same numbers. The reference statistics of a COCO protocol are computed once
from the drawn COCO images and cached as ``.npz``. Process 0 writes ``results.json``,
``results.md`` and ``grid.png`` (the first 16 generations).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import numpy as np

from instaflow_jax.data.prompts import PromptSource, load_prompts
from instaflow_jax.evaluation.coco import (
    PAPER_NUMBERS,
    Protocol,
    Sample,
    draw_samples,
    get_protocol,
    load_reference_image,
    prompt_samples,
    samples_digest,
)
from instaflow_jax.evaluation.feature_networks import FeatureNetworks, load_feature_networks
from instaflow_jax.evaluation.feature_shards import FeatureShards
from instaflow_jax.evaluation.fid import GaussianStats, frechet_distance
from instaflow_jax.evaluation.report import write_report
from instaflow_jax.files import ensure_writable_folder, write_json_atomic
from instaflow_jax.image_io import make_grid, save_png, to_uint8
from instaflow_jax.parallel import (
    barrier,
    batch_sharded,
    enable_compilation_cache,
    initialize_distributed,
    pad_batch,
    padded_size,
    replicated,
)
from instaflow_jax.progress import progress_bar
from instaflow_jax.sampling.noise import noise_for_indices
from instaflow_jax.sampling.text_to_image import (
    NonFiniteOutputError,
    SamplerSpec,
    describe_non_finite,
    make_generate_fn,
    with_finite_flags,
)
from instaflow_jax.sampling.velocity import guidance_enabled

GRID_IMAGES = 16
DEFAULT_STATS_CACHE = os.path.join("~", ".cache", "instaflow_jax", "fid_reference")
PROMPT_KINDS = {".txt": "text", ".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """What to evaluate and how (the flags of ``instaflow-eval``).

    Attributes:
      model: pipeline folder, cached repo id or ``tiny-random``.
      out: results folder (features, results.json/md, grid.png, prompts.json).
      protocol: ``coco2017-5k`` or ``coco2014-30k`` (with ``coco``), ignored with ``prompts``.
      coco: local COCO folder (annotations/ + val20xx/).
      prompts: a prompt file (.txt one per line, .jsonl/.csv/.parquet column ``prompt``) instead
        of COCO captions: CLIP score only, FID only with ``ref_stats``.
      num_images: override the protocol's image count (not comparable to the paper).
      steps, guidance, solver, negative_prompt: sampling (``Pipeline.generate``'s meaning).
      batch: images per batch per process (rounded up to a multiple of the local device count).
      seed: noise seed; sample i starts from ``fold_in(key(seed), i)``.
      caption_seed: seed of the protocol's image and caption draw.
      inception: FID Inception weights (``pt_inception-2015-12-05-6726825d.pth`` or its
        ``.safetensors`` conversion); None skips FID.
      clip: a transformers ``CLIPModel`` folder (the paper: ViT-g/14); None skips CLIP score.
      ref_stats: precomputed reference ``.npz`` (``mu``, ``sigma``) instead of the COCO images.
      stats_cache: where reference statistics are cached.
      save_images: also write every generation as ``OUT/images/<index>.png``.
      height, width: generation size (default: the model's native size, 512² for SD 1.5).
      dtype, attention: as ``load_pipeline``.
      distributed: call ``jax.distributed.initialize`` first (auto-detected on TPU pods and SLURM);
        every process runs the same command, ``out`` and ``stats_cache`` on a shared filesystem.
      coordinator_address, num_processes, process_id: that call's arguments for hosts started by
        hand (``HOST:PORT`` of process 0; all three or none); giving them implies ``distributed``.
    """

    model: str
    out: str
    protocol: str = "coco2017-5k"
    coco: str | None = None
    prompts: str | None = None
    num_images: int | None = None
    steps: int = 1
    guidance: float = 0.0
    solver: str = "euler"
    negative_prompt: str = ""
    batch: int = 64
    seed: int = 0
    caption_seed: int = 0
    inception: str | None = None
    clip: str | None = None
    ref_stats: str | None = None
    stats_cache: str = DEFAULT_STATS_CACHE
    save_images: bool = False
    height: int | None = None
    width: int | None = None
    dtype: str = "auto"
    attention: str = "auto"
    distributed: bool = False
    coordinator_address: str = ""
    num_processes: int = 0
    process_id: int = -1


def check_settings(settings: EvalSettings) -> None:
    """Fail before loading anything on settings that cannot work."""
    manual = (settings.coordinator_address, settings.num_processes > 0, settings.process_id >= 0)
    if any(manual) and not all(manual):
        raise ValueError(
            "give --coordinator-address HOST:PORT, --num-processes N and --process-id I together "
            "(or none of them, with --distributed, on TPU pods and SLURM)."
        )
    if all(manual) and settings.process_id >= settings.num_processes:
        raise ValueError(
            f"--process-id {settings.process_id} must be < --num-processes {settings.num_processes}."
        )
    if settings.batch < 1:
        raise ValueError(f"--batch must be ≥ 1, got {settings.batch}.")
    if settings.steps < 1:
        raise ValueError(f"--steps must be ≥ 1, got {settings.steps}.")
    if settings.prompts is None and settings.coco is None:
        raise ValueError("give --coco PATH (a COCO folder) for a protocol, or --prompts FILE.")
    if settings.prompts is not None and settings.coco is not None:
        raise ValueError("give either --coco (a protocol) or --prompts (a custom prompt set), not both.")
    if settings.inception is None and settings.clip is None:
        raise ValueError(
            "nothing to score: give --inception (FID weights, pt_inception-2015-12-05-6726825d.pth) "
            "and/or --clip (a CLIPModel folder)."
        )
    if settings.prompts is None:
        get_protocol(settings.protocol)
    for name in ("inception", "ref_stats", "prompts"):
        path = getattr(settings, name)
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"--{name.replace('_', '-')} {path!r} is not a file.")
    if settings.clip is not None and not os.path.isdir(settings.clip):
        raise FileNotFoundError(f"--clip {settings.clip!r} is not a folder (a transformers CLIPModel).")
    ensure_writable_folder(settings.out, "--out")


def load_samples(settings: EvalSettings) -> tuple[list[Sample], Protocol | None]:
    """The prompts (and reference images) to evaluate: a protocol's draw or a prompt file."""
    if settings.prompts is not None:
        kind = PROMPT_KINDS.get(os.path.splitext(settings.prompts)[1].lower(), "text")
        prompts = load_prompts(PromptSource(kind=kind, path=settings.prompts, dedupe=False))
        if settings.num_images:
            prompts = prompts[: settings.num_images]
        return prompt_samples(prompts), None
    protocol = get_protocol(settings.protocol)
    return draw_samples(settings.coco, protocol, settings.caption_seed, settings.num_images), protocol


def make_eval_step(pipe: Any, nets: FeatureNetworks, spec: SamplerSpec):
    """``step(params, ids, uncond_ids, z0, g, clip_ids) -> ({"pool", "clip_cos"}, images, finite)``:
    generation and both feature networks in one pure function (jit it). ``params`` holds the
    pipeline's under ``"pipeline"`` beside ``nets.params``."""
    generate = with_finite_flags(make_generate_fn(pipe.modules, spec, pipe.scheduler_config))

    def step(params, ids, uncond_ids, z0, g, clip_ids):
        images, finite = generate(params["pipeline"], ids, uncond_ids, z0, g)
        return nets.features(params, images, clip_ids), images, finite

    return step


def _reference_stats(
    settings: EvalSettings, samples: list[Sample], protocol: Protocol, nets: FeatureNetworks, mesh: Any
) -> GaussianStats:
    """Reference statistics: the given ``.npz``, the cache, or computed from the COCO images."""
    if settings.ref_stats is not None:
        return GaussianStats.load(settings.ref_stats)
    digest = samples_digest(samples)
    key = f"{protocol.name}-n{len(samples)}-seed{settings.caption_seed}-{protocol.fid_size}px-{digest}"
    key += f"-{nets.inception_id}"
    cache = os.path.expanduser(settings.stats_cache)
    path = os.path.join(cache, key + ".npz")
    if os.path.isfile(path):
        print(f"reference statistics: {path} (cached)", flush=True)
        return GaussianStats.load(path)
    shards = FeatureShards(
        os.path.join(cache, key), len(samples), settings.batch, {"kind": "reference", "key": key}
    )
    size, rep, data = protocol.fid_size, replicated(mesh), batch_sharded(mesh)
    padded = padded_size(settings.batch, mesh)
    pool = jax.jit(nets.pool_features, in_shardings=(rep, data), out_shardings=data)
    todo = shards.todo(jax.process_index(), jax.process_count())
    total = sum(len(shards.indices(b)) for b in todo)
    bar = progress_bar(total, desc="reference features", unit="img")
    for batch in todo:
        indices = shards.indices(batch)
        images = np.stack([load_reference_image(samples[i].path, size) for i in indices])
        features = np.asarray(pool(nets.params, pad_batch(images, padded)))[: len(indices)]
        shards.write(batch, {"pool": features})
        bar.update(len(indices))
    bar.close()
    barrier("instaflow_eval_reference")
    stats = GaussianStats.from_features(shards.read()["pool"])
    if jax.process_index() == 0:
        stats.save(path)
        print(f"reference statistics: wrote {path}", flush=True)
    return stats


def evaluate(settings: EvalSettings) -> dict[str, Any]:
    """Run the evaluation (see the module docstring); returns the results (process 0; {} elsewhere)."""
    import instaflow_jax
    from instaflow_jax.precision import resolve_dtype
    from instaflow_jax.weights.tiny import resolve_model

    check_settings(settings)
    if settings.distributed or settings.coordinator_address:
        initialize_distributed(settings.coordinator_address, settings.num_processes, settings.process_id)
    enable_compilation_cache()
    samples, protocol = load_samples(settings)
    digest = samples_digest(samples)
    out = settings.out
    if jax.process_index() == 0:
        write_json_atomic(
            os.path.join(out, "prompts.json"),
            {"digest": digest, "samples": [dataclasses.asdict(s) for s in samples]},
            indent=1,
            ensure_ascii=False,
        )
    pipe = instaflow_jax.load_pipeline(
        resolve_model(settings.model), dtype=resolve_dtype(settings.dtype), attention_impl=settings.attention
    )
    mesh = pipe.mesh
    height = settings.height or pipe.native_size[0]
    width = settings.width or pipe.native_size[1]
    fid_size = protocol.fid_size if protocol is not None else None
    nets = load_feature_networks(settings.inception, settings.clip, fid_size, mesh)

    reference = None
    if nets.has_inception and (settings.ref_stats is not None or protocol is not None):
        reference = _reference_stats(settings, samples, protocol, nets, mesh)

    guidance = guidance_enabled(settings.guidance)
    manifest = {
        "kind": "generated",
        "model": settings.model,
        "prompts_digest": digest,
        "steps": settings.steps,
        "guidance": settings.guidance,
        "solver": settings.solver,
        "negative_prompt": settings.negative_prompt if guidance else "",
        "seed": settings.seed,
        "size": [height, width],
        "fid_size": fid_size,
        "inception": nets.inception_id,
        "clip": nets.clip_id,
    }
    shards = FeatureShards(os.path.join(out, "features"), len(samples), settings.batch, manifest)
    spec = SamplerSpec(settings.steps, settings.solver, guidance, "image")
    step = make_eval_step(pipe, nets, spec)
    rep, data = replicated(mesh), batch_sharded(mesh)
    jitted = jax.jit(step, in_shardings=(rep, data, data if guidance else None, data, rep, data))
    params = {**nets.params, "pipeline": pipe.params}
    padded = padded_size(settings.batch, mesh)
    latent = (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor, pipe.latent_channels)
    negatives = pipe.tokenize([settings.negative_prompt] * padded) if guidance else None
    grid_batches = set(range(-(-GRID_IMAGES // settings.batch)))
    todo = shards.todo(jax.process_index(), jax.process_count())
    print(
        f"evaluating {settings.model}: {len(samples)} prompts, {settings.steps} step(s) {settings.solver}, "
        f"g={settings.guidance}, {height}×{width}, {len(mesh.devices.flat)} device(s) × "
        f"{jax.process_count()} process(es); {len(shards.done())} of {shards.num_batches} batches "
        "already done",
        flush=True,
    )

    def batch_args(batch: int) -> tuple:
        indices = shards.indices(batch)
        prompts = [samples[i].caption for i in indices]
        z0 = np.asarray(noise_for_indices(settings.seed, indices, latent))
        return (
            params,
            pad_batch(pipe.tokenize(prompts), padded),
            negatives,
            pad_batch(z0, padded),
            np.float32(settings.guidance),
            pad_batch(nets.tokenize(prompts), padded),
        )

    compile_s = time.perf_counter()
    compiled = jitted.lower(*batch_args(todo[0])).compile() if todo else None
    compile_s = time.perf_counter() - compile_s
    bar = progress_bar(sum(len(shards.indices(b)) for b in todo), desc="generating + features", unit="img")
    start, generated = time.perf_counter(), 0
    for batch in todo:
        indices = shards.indices(batch)
        features, images, finite = compiled(*batch_args(batch))
        features, finite = jax.device_get((features, finite))  # images stay on device unless needed
        if not np.all(finite[: len(indices)]):
            bad = np.flatnonzero(~np.asarray(finite[: len(indices)]))
            prompts = [samples[i].caption for i in indices]
            raise NonFiniteOutputError(
                describe_non_finite(bad, prompts, pipe.params, settings.guidance, spec)
            )
        if settings.save_images or batch in grid_batches:
            images = np.asarray(images)[: len(indices)]
            if settings.save_images:
                for i, image in zip(indices, images):
                    save_png(os.path.join(out, "images", f"{i:06d}.png"), image)
            if batch in grid_batches:
                np.save(os.path.join(out, "features", f"grid-{batch:06d}.npy"), to_uint8(images))
        shards.write(batch, {k: np.asarray(v)[: len(indices)] for k, v in features.items()})
        generated += len(indices)
        bar.update(len(indices))
    bar.close()
    seconds = time.perf_counter() - start
    barrier("instaflow_eval_features")
    if jax.process_index() != 0:
        return {}
    timing = {"generated_this_run": generated, "seconds_this_run": seconds, "compile_s": compile_s}
    return _finish(settings, shards, samples, protocol, reference, manifest, timing)


def _finish(settings, shards, samples, protocol, reference, manifest, timing) -> dict[str, Any]:
    """Reduce the feature shards to the scores; write results.json, results.md and grid.png."""
    from instaflow_jax.evaluation.clip_score import clip_score, torchmetrics_clip_score

    features = shards.read()
    results: dict[str, Any] = {
        "protocol": protocol.name if protocol is not None else "prompts",
        "prompts": settings.prompts,
        "num_images": len(samples),
        "paper_protocol": protocol is not None and len(samples) == protocol.num_images,
        "prompts_digest": manifest["prompts_digest"],
        "settings": {**manifest, "batch": settings.batch, "caption_seed": settings.caption_seed},
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "images_per_s": timing["generated_this_run"] / timing["seconds_this_run"]
        if timing["generated_this_run"]
        else None,
        **timing,
        "fid": None,
        "clip_score": None,
        "clip_score_torchmetrics": None,
    }
    if reference is not None:
        generated_stats = GaussianStats.from_features(features["pool"])
        results["fid"] = frechet_distance(
            generated_stats.mu, generated_stats.sigma, reference.mu, reference.sigma
        )
    if "clip_cos" in features:
        results["clip_score"] = clip_score(features["clip_cos"])
        results["clip_score_torchmetrics"] = torchmetrics_clip_score(features["clip_cos"])
    grids = sorted(name for name in os.listdir(shards.folder) if name.startswith("grid-"))
    if grids:
        images = np.concatenate([np.load(os.path.join(shards.folder, name)) for name in grids])
        grid = make_grid(images[:GRID_IMAGES].astype(np.float32) / 255.0, columns=4)
        save_png(os.path.join(settings.out, "grid.png"), grid)
    write_json_atomic(os.path.join(settings.out, "results.json"), results, indent=1)
    write_report(
        os.path.join(settings.out, "results.md"), results, PAPER_NUMBERS.get(results["protocol"], [])
    )
    print(json.dumps({k: results[k] for k in ("fid", "clip_score", "clip_score_torchmetrics", "num_images")}))
    return results
