"""Evaluation of the small-scale reproduction: FID and prompt accuracy on classifier features,
straightness, per-step velocity change, sample grids and plots.

Every model generates for the same ``num_samples`` evaluation prompts (drawn from the toy prompt
distribution with the eval seed) from the same initial noise (``fold_in(key(eval seed), i)``).
FID compares the classifier's 64-d features of those generations with the features of
``num_samples`` real images of the same prompts; prompt accuracy is the fraction of attributes
named in a prompt that the classifier finds in the image generated for it. Each model's images,
features and predictions are kept in ``eval/features/<model>-<steps>/`` with the evaluation job's
``FeatureShards`` (manifest: the UNet's weights, steps, guidance, seed, classifier), so a rerun of an
interrupted evaluation only generates what is missing.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

import instaflow_jax
from instaflow_jax.evaluation.feature_shards import FeatureShards
from instaflow_jax.evaluation.fid import fid_from_features
from instaflow_jax.examples.toy.classifier import features_and_predictions, load_or_train
from instaflow_jax.examples.toy.data import ToyShapes
from instaflow_jax.examples.toy.figures import plot_quality_vs_steps, plot_samples, plot_straightness
from instaflow_jax.files import fingerprint
from instaflow_jax.parallel import pad_batch
from instaflow_jax.sampling import (
    dpm_solver_trajectory,
    euler_timesteps,
    euler_trajectory,
    rf_times,
    trajectory_straightness,
    trajectory_velocity_change,
)
from instaflow_jax.sampling.noise import noise_for_indices
from instaflow_jax.sampling.text_to_image import SamplerSpec, encode_text, make_schedule, text_field
from instaflow_jax.sampling.velocity import guidance_enabled


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID between Gaussians fitted to feature sets ``a`` [N, D] and ``b`` [M, D]: the evaluation
    package's (pytorch-fid's arithmetic) on the classifier's features; a collapsed model's
    near-singular covariance never stops the toy (imaginary parts are dropped, not checked)."""
    return fid_from_features(a, b, imaginary_atol=None)


def prompt_accuracy(predicted: np.ndarray, labels: np.ndarray, named: np.ndarray) -> float:
    """Mean over samples of the fraction of named attributes predicted correctly."""
    correct = (predicted == labels) & named
    return float(np.mean(correct.sum(1) / named.sum(1)))


def solver_for(model: str) -> str:
    """The toy's teacher predicts ε (DPM-Solver++); every other toy model is a rectified flow (Euler)."""
    return "dpmpp2m" if model == "teacher" else "euler"


def generate_all(
    pipe: Any, prompts: list[str], noise: np.ndarray, chunk: int = 128, **kwargs: Any
) -> np.ndarray:
    """Images for all prompts in fixed-size chunks (the last one padded), so one compile serves all."""
    out, chunk = [], min(chunk, len(prompts))
    for start in range(0, len(prompts), chunk):
        part, latents = prompts[start : start + chunk], noise[start : start + chunk]
        part = part + [part[-1]] * (chunk - len(part))
        latents = pad_batch(latents, chunk).transpose(0, 3, 1, 2)
        out.append(pipe.generate(part, latents=latents, **kwargs)[: min(chunk, len(prompts) - start)])
    return np.concatenate(out)


def model_trajectory(
    pipe: Any, kind: str, prompts: list[str], noise: np.ndarray, steps: int, guidance: float
):
    """(Z [N + 1, B, h, w, C], t [N + 1]) of the teacher (DPM-Solver++ in rectified-flow
    coordinates) or of a rectified flow (Euler), with CFG when ``guidance_enabled(guidance)``:
    the field and schedule of ``sampling.text_to_image``, solved step by step."""
    spec = SamplerSpec(steps, solver_for(kind), guidance_enabled(guidance), "latent")
    encoder, encoder_params = pipe.modules["text_encoder"], pipe.params["text_encoder"]
    context = encode_text(encoder, encoder_params, pipe.tokenize(prompts))
    uncond = encode_text(encoder, encoder_params, pipe.tokenize([""] * len(prompts))) if spec.cfg else None
    field = text_field(pipe.modules, pipe.params, context, uncond, guidance)
    schedule = make_schedule(spec, pipe.scheduler_config)
    if schedule is not None:
        return jax.jit(lambda z: dpm_solver_trajectory(field, z, schedule)[0])(noise), rf_times(schedule)
    zs, _ = jax.jit(lambda z: euler_trajectory(field, z, steps))(noise)
    times = np.concatenate([1.0 - np.asarray(euler_timesteps(steps)) / 1000.0, [1.0]])
    return zs, times


def evaluate(run_dir: str, models: dict[str, str], config: Any, guidance: dict[str, float]) -> dict[str, Any]:
    """Evaluate the exported pipelines ``models`` (name → folder; ``teacher``, ``2rf``, …).

    Writes ``eval/results.json``, ``eval/results.md`` and figures; returns the results.
    """
    out = os.path.join(run_dir, "eval")
    os.makedirs(out, exist_ok=True)
    size = config.image_size
    classifier_path = os.path.join(out, "classifier.msgpack")
    classifier = load_or_train(classifier_path, size, config.eval.classifier_steps)
    real = ToyShapes(config.eval.num_samples, seed=config.eval.seed, height=size, width=size).read(
        np.arange(config.eval.num_samples)
    )
    real_features, real_predicted = features_and_predictions(classifier, real["images"])
    # The floor of the metric: other real images of the same distribution (another seed).
    other = ToyShapes(config.eval.num_samples, seed=config.eval.seed + 1, height=size, width=size)
    other_features, _ = features_and_predictions(
        classifier, other.read(np.arange(config.eval.num_samples))["images"]
    )
    prompts = real["prompt"]
    noise = np.asarray(noise_for_indices(config.eval.seed, np.arange(len(prompts)), (size, size, 3)))
    rows = [
        {
            "model": "real images",
            "steps": 0,
            "guidance": 0.0,
            "fid": frechet_distance(real_features, other_features),
            "prompt_accuracy": prompt_accuracy(real_predicted, real["labels"], real["named"]),
        }
    ]
    grids, samples = {}, {}
    pipes = {name: instaflow_jax.load_pipeline(folder) for name, folder in models.items()}
    plan = [("teacher", s) for s in config.eval.teacher_steps] + [("2rf", s) for s in config.eval.rf_steps]
    plan += [(name, 1) for name in models if name not in ("teacher", "2rf")]
    unets = {name: fingerprint(os.path.join(folder, "unet")) for name, folder in models.items()}
    classifier_print = fingerprint(classifier_path)
    for name, steps in plan:
        pipe, g = pipes[name], guidance[name]
        # The evaluation job's per-batch feature files (one batch per model and step count): a rerun
        # of an interrupted evaluation skips what is done; other weights or settings are refused.
        manifest = {"model": unets[name], "steps": steps, "guidance": g}
        manifest.update(eval_seed=config.eval.seed, classifier=classifier_print)
        shards = FeatureShards(
            os.path.join(out, "features", f"{name}-{steps}"), len(prompts), len(prompts), manifest
        )
        if shards.todo():
            images = generate_all(
                pipe,
                prompts,
                noise,
                num_steps=steps,
                guidance_scale=g,
                solver=solver_for(name),
                height=size,
                width=size,
            )
            features, predicted = features_and_predictions(classifier, images)
            shards.write(0, {"images": images, "features": features, "predicted": predicted})
        stored = shards.read()
        images, features, predicted = stored["images"], stored["features"], stored["predicted"]
        rows.append(
            {
                "model": name,
                "steps": steps,
                "guidance": g,
                "fid": frechet_distance(real_features, features),
                "prompt_accuracy": prompt_accuracy(predicted, real["labels"], real["named"]),
            }
        )
        grids[f"{name} ({steps} step{'s' if steps > 1 else ''})"] = images[: config.eval.grid_prompts]
        samples[(name, steps)] = images
        fid, accuracy = rows[-1]["fid"], rows[-1]["prompt_accuracy"]
        print(f"  {name:>14} {steps:2d} steps: FID {fid:8.3f}  prompt accuracy {accuracy:.3f}")
    flows = {}
    k = config.eval.straightness_samples
    for name in ("teacher", "2rf"):
        zs, ts = model_trajectory(pipes[name], name, prompts[:k], noise[:k], 25, guidance[name])
        s, _ = trajectory_straightness(zs, ts)
        flows[name] = {
            "straightness": float(s),
            "velocity_change": np.asarray(trajectory_velocity_change(zs, ts)).tolist(),
            "times": ts.tolist(),
        }
    results = {
        "rows": rows,
        "flows": flows,
        "distillation_error": distillation_error(samples),
        "num_samples": config.eval.num_samples,
        "eval_seed": config.eval.seed,
        "straightness_samples": k,
        "guidance": guidance,
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    write_report(
        out, results, prompts[: config.eval.grid_prompts], grids, real["images"][: config.eval.grid_prompts]
    )
    return results


ONE_STEP_STUDENTS = {
    "2rf+distill": "2rf",
    "2rf+distill+lpips": "2rf",
    "direct distill": "teacher",
    "2rf": "2rf",
    "teacher": "teacher",
}


def distillation_error(samples: dict[tuple[str, int], np.ndarray]) -> list[dict[str, Any]]:
    """RMSE (pixels in [0, 1]) between each one-step model's images and its own teacher's images
    at the most steps evaluated, from the same prompts and noises: the distillation error itself,
    which FID to real images does not isolate. ``samples``: (model, steps) → images [N, H, W, 3]."""
    rows = []
    for student, teacher in ONE_STEP_STUDENTS.items():
        many = max((s for m, s in samples if m == teacher), default=None)
        if (student, 1) not in samples or many is None or many == 1:
            continue
        difference = samples[(student, 1)] - samples[(teacher, many)]
        rmse = float(np.sqrt(np.mean(difference**2)))
        rows.append({"model": student, "steps": 1, "teacher": teacher, "teacher_steps": many, "rmse": rmse})
    return rows


def write_report(
    out: str, results: dict[str, Any], prompts: list[str], grids: dict[str, np.ndarray], real: np.ndarray
) -> None:
    """results.md (table) and the figures: samples.png, quality_vs_steps.png, straightness.png."""
    lines = [
        "| model | steps | guidance | FID (classifier features) ↓ | prompt accuracy ↑ |",
        "|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        cells = (
            row["model"],
            row["steps"],
            f"{row['guidance']:g}",
            f"{row['fid']:.3f}",
            f"{row['prompt_accuracy']:.3f}",
        )
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    flows = results["flows"]
    lines += ["", "| flow | straightness S ↓ |", "|---|---|"]
    lines += [f"| {name} | {flow['straightness']:.4f} |" for name, flow in flows.items()]
    if results.get("distillation_error"):
        lines += ["", "| one-step model | its teacher | RMSE to the teacher's image ↓ |", "|---|---|---|"]
        lines += [
            f"| {r['model']} (1 step) | {r['teacher']} ({r['teacher_steps']} steps) | {r['rmse']:.4f} |"
            for r in results["distillation_error"]
        ]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")

    rows = {"real images": real, **grids}
    plot_samples(prompts, rows, os.path.join(out, "samples.png"))
    plot_quality_vs_steps(results, os.path.join(out, "quality_vs_steps.png"))
    plot_straightness(flows, os.path.join(out, "straightness.png"))
