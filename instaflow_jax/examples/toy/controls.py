"""Controls for a finished ``instaflow-toy`` run: how much of each verdict is noise or budget.

1. **Evaluation noise**: the whole evaluation again on other eval seeds (other prompts and noise),
   so every FID gets a spread.
2. **Matched budget**: the 2-RF + distill student has had reflow *and* distillation steps, the
   direct-distillation baseline only distillation steps. This trains the baseline for as many
   steps as both stages together and evaluates it beside the others.

Usage (after ``instaflow-toy --workdir runs/toy`` finished; add ``--variant quality`` for such runs):

    python benchmarks/toy_controls.py --workdir runs/toy --seeds 100 101
    (the same: python -m instaflow_jax.examples.toy.controls --workdir runs/toy …)

3. **Fidelity**: how close each one-step student comes to its own teacher from the same noise
   (RMSE and FID between the two sample sets) — the distillation error itself.

Writes ``runs/toy/controls/summary.md`` (mean ± standard deviation over seeds) and
``controls/fidelity.md``, and prints them. ``--fidelity-only`` skips 1 and 2;
``--guidance-sweep 1 2 3`` adds the teacher's FID and prompt accuracy at those guidance scales.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from typing import Any

import numpy as np

from instaflow_jax.examples.toy.config import get_config
from instaflow_jax.examples.toy.main import use_every_core
from instaflow_jax.examples.toy.stages import STAGES, distill, teacher_start


def matched_direct(config: Any, workdir: str, done: dict) -> str:
    """The direct-distillation baseline trained for reflow + distillation steps; its export."""
    steps = config.reflow.steps + config.distill.steps
    folder = os.path.join(workdir, "controls", f"direct_{steps}")
    marker = os.path.join(folder, "done.json")
    if not os.path.isfile(marker):
        result = distill(
            config,
            os.path.join(workdir, "controls"),
            f"direct_{steps}",
            "direct_distill",
            teacher_start(config, workdir, done),
            done["teacher_triplets"]["folder"],
            num_steps=steps,
        )
        with open(marker, "w") as f:
            json.dump(result, f)
    with open(marker) as f:
        return json.load(f)["export"]


def evaluate_seed(
    config: Any, workdir: str, models: dict[str, str], guidance: dict[str, float], seed: int
) -> dict:
    """The toy evaluation on eval seed ``seed`` (the run's classifier reused); its results."""
    from instaflow_jax.examples.toy.evaluate import evaluate

    out = os.path.join(workdir, "controls", f"eval_seed{seed}")
    results_file = os.path.join(out, "eval", "results.json")
    if not os.path.isfile(results_file):
        os.makedirs(os.path.join(out, "eval"), exist_ok=True)
        shutil.copy(os.path.join(workdir, "eval", "classifier.msgpack"), os.path.join(out, "eval"))
        config = config.copy_and_resolve_references()
        config.eval.seed = seed
        evaluate(out, models, config, guidance)
    with open(results_file) as f:
        return json.load(f)


def fidelity(config: Any, workdir: str, done: dict) -> str:
    """How close each one-step student comes to its own teacher, on the eval prompts and noises.

    Students: "2rf+distill" (teacher: the 2-RF, 25 Euler steps) and "direct distill" (teacher:
    the ε-teacher, 25 DPM-Solver++ steps); the one-step flows are listed beside them. Per-sample
    RMSE in [0, 1] pixel units and FID between the student's and its teacher's samples, both from
    the same prompts and noises. Markdown.
    """
    import instaflow_jax
    from instaflow_jax.examples.toy.classifier import features_and_predictions, load_or_train
    from instaflow_jax.examples.toy.data import ToyShapes
    from instaflow_jax.examples.toy.evaluate import frechet_distance, generate_all, solver_for
    from instaflow_jax.sampling.noise import noise_for_indices

    n, size, seed = config.eval.num_samples, config.image_size, config.eval.seed
    prompts = ToyShapes(n, seed=seed, height=size, width=size).read(np.arange(n))["prompt"]
    noise = np.asarray(noise_for_indices(seed, np.arange(n), (size, size, 3)))
    classifier = load_or_train(
        os.path.join(workdir, "eval", "classifier.msgpack"), size, config.eval.classifier_steps
    )
    pipes = {
        name: instaflow_jax.load_pipeline(done[stage]["export"])
        for name, stage in (("teacher", "teacher"), ("2rf", "reflow"), ("2rf+distill", "distill"))
        + (("direct distill", "direct"),)
    }

    def sample(name: str, steps: int, guidance: float) -> np.ndarray:
        return generate_all(
            pipes[name],
            prompts,
            noise,
            num_steps=steps,
            guidance_scale=guidance,
            solver=solver_for(name),
            height=size,
            width=size,
        )

    targets = {
        "teacher": sample("teacher", 25, config.teacher.guidance),
        "2rf": sample("2rf", 25, config.reflow.guidance),
    }
    students = {
        "2rf+distill": ("2rf", sample("2rf+distill", 1, 0.0)),
        "direct distill": ("teacher", sample("direct distill", 1, 0.0)),
        "2rf, 1 Euler step": ("2rf", sample("2rf", 1, config.reflow.guidance)),
        "teacher, 1 DPM-Solver++ step": ("teacher", sample("teacher", 1, config.teacher.guidance)),
    }
    lines = [
        f"Eval seed {seed}, {n} samples; teachers at 25 steps.",
        "",
        "| one-step model | its teacher | RMSE to teacher ↓ | FID to teacher's samples ↓ |",
        "|---|---|---|---|",
    ]
    for name, (teacher, images) in students.items():
        rmse = float(np.sqrt(np.mean((images - targets[teacher]) ** 2)))
        fid = frechet_distance(
            features_and_predictions(classifier, targets[teacher])[0],
            features_and_predictions(classifier, images)[0],
        )
        lines.append(f"| {name} | {teacher} (25 steps) | {rmse:.4f} | {fid:.1f} |")
    return "\n".join(lines) + "\n"


def guidance_sweep(config: Any, workdir: str, done: dict, guidances: list[float]) -> str:
    """The teacher at 2 and 25 DPM-Solver++ steps for each guidance scale: FID to real images,
    prompt accuracy and the pixel standard deviation (real images' in the header). Markdown."""
    import instaflow_jax
    from instaflow_jax.examples.toy.classifier import features_and_predictions, load_or_train
    from instaflow_jax.examples.toy.data import ToyShapes
    from instaflow_jax.examples.toy.evaluate import frechet_distance, generate_all, prompt_accuracy
    from instaflow_jax.sampling.noise import noise_for_indices

    n, size, seed = config.eval.num_samples, config.image_size, config.eval.seed
    real = ToyShapes(n, seed=seed, height=size, width=size).read(np.arange(n))
    noise = np.asarray(noise_for_indices(seed, np.arange(n), (size, size, 3)))
    classifier = load_or_train(
        os.path.join(workdir, "eval", "classifier.msgpack"), size, config.eval.classifier_steps
    )
    real_features, _ = features_and_predictions(classifier, real["images"])
    pipe = instaflow_jax.load_pipeline(done["teacher"]["export"])
    lines = [
        f"Teacher, eval seed {seed}, {n} samples; real images' pixel std {real['images'].std():.4f}.",
        "",
        "| guidance | steps | FID ↓ | prompt accuracy ↑ | pixel std |",
        "|---|---|---|---|---|",
    ]
    for guidance in guidances:
        for steps in (2, 25):
            images = generate_all(
                pipe,
                real["prompt"],
                noise,
                num_steps=steps,
                guidance_scale=guidance,
                solver="dpmpp2m",
                height=size,
                width=size,
            )
            features, predicted = features_and_predictions(classifier, images)
            fid = frechet_distance(real_features, features)
            accuracy = prompt_accuracy(predicted, real["labels"], real["named"])
            lines.append(f"| {guidance:g} | {steps} | {fid:.1f} | {accuracy:.3f} | {images.std():.4f} |")
    return "\n".join(lines) + "\n"


def summarize(per_seed: dict[int, dict]) -> str:
    """Markdown: FID and prompt accuracy as mean ± std over seeds, straightness likewise."""
    seeds = sorted(per_seed)
    keys = [(r["model"], r["steps"]) for r in per_seed[seeds[0]]["rows"]]
    lines = [
        f"Seeds {', '.join(map(str, seeds))}; {per_seed[seeds[0]]['num_samples']} samples each; "
        "mean ± standard deviation over seeds.",
        "",
        "| model | steps | FID ↓ | prompt accuracy ↑ |",
        "|---|---|---|---|",
    ]
    for model, steps in keys:
        rows = [
            next(r for r in per_seed[s]["rows"] if (r["model"], r["steps"]) == (model, steps)) for s in seeds
        ]
        fid = np.array([r["fid"] for r in rows])
        accuracy = np.array([r["prompt_accuracy"] for r in rows])
        lines.append(
            f"| {model} | {steps} | {fid.mean():.1f} ± {fid.std(ddof=1):.1f} "
            f"| {accuracy.mean():.3f} ± {accuracy.std(ddof=1):.3f} |"
        )
    lines += ["", "| flow | straightness S ↓ |", "|---|---|"]
    for name in per_seed[seeds[0]]["flows"]:
        s = np.array([per_seed[seed]["flows"][name]["straightness"] for seed in seeds])
        lines.append(f"| {name} | {s.mean():.4f} ± {s.std(ddof=1):.4f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a finished instaflow-toy run folder")
    parser.add_argument("--variant", default="", help="the variant the run used ('' or 'quality')")
    parser.add_argument("--seeds", type=int, nargs="+", default=[100, 101], help="extra eval seeds")
    parser.add_argument(
        "--fidelity-only", action="store_true", help="only the students-vs-own-teacher table (minutes)"
    )
    parser.add_argument(
        "--guidance-sweep",
        type=float,
        nargs="*",
        default=[],
        help="also sample the teacher at these guidances",
    )
    args = parser.parse_args()
    use_every_core()
    config = get_config(args.variant)
    stages = os.path.join(args.workdir, "stages")
    if not os.path.isfile(os.path.join(stages, "eval.json")):
        raise SystemExit(f"error: {args.workdir} has no finished run; run instaflow-toy --workdir first.")
    done = {}
    for name in STAGES:
        with open(os.path.join(stages, f"{name}.json")) as f:
            done[name] = json.load(f)
    os.makedirs(os.path.join(args.workdir, "controls"), exist_ok=True)
    table = fidelity(config, args.workdir, done)
    with open(os.path.join(args.workdir, "controls", "fidelity.md"), "w") as f:
        f.write(table)
    print(table)
    if args.guidance_sweep:
        sweep = guidance_sweep(config, args.workdir, done, args.guidance_sweep)
        with open(os.path.join(args.workdir, "controls", "guidance_sweep.md"), "w") as f:
            f.write(sweep)
        print(sweep)
    if args.fidelity_only:
        return
    steps = config.reflow.steps + config.distill.steps
    models = {
        "teacher": done["teacher"]["export"],
        "2rf": done["reflow"]["export"],
        "2rf+distill": done["distill"]["export"],
        "direct distill": done["direct"]["export"],
        f"direct distill ({steps} steps)": matched_direct(config, args.workdir, done),
    }
    guidance = {name: 0.0 for name in models} | {
        "teacher": config.teacher.guidance,
        "2rf": config.reflow.guidance,
    }
    per_seed = {seed: evaluate_seed(config, args.workdir, models, guidance, seed) for seed in args.seeds}
    if config.eval.seed not in per_seed:
        per_seed[config.eval.seed] = evaluate_seed(config, args.workdir, models, guidance, config.eval.seed)
    text = summarize(per_seed)
    with open(os.path.join(args.workdir, "controls", "summary.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
