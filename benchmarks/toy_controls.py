"""Controls for a finished ``instaflow-toy`` run: how much of each verdict is noise or budget.

1. **Evaluation noise**: the whole evaluation again on other eval seeds (other prompts and noise),
   so every FID gets a spread.
2. **Matched budget**: the 2-RF + distill student has had reflow *and* distillation steps, the
   direct-distillation baseline only distillation steps. This trains the baseline for as many
   steps as both stages together and evaluates it beside the others.

Usage (after ``instaflow-toy --workdir runs/toy`` finished; add ``--variant quality`` for such runs):

    python benchmarks/toy_controls.py --workdir runs/toy --seeds 100 101

Writes ``runs/toy/controls/summary.md`` (mean ± standard deviation over seeds) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from typing import Any

import numpy as np

from instaflow_jax.examples import toy
from instaflow_jax.examples.toy_config import get_config


def matched_direct(cfg: Any, workdir: str, done: dict) -> str:
    """The direct-distillation baseline trained for reflow + distillation steps; its export."""
    steps = cfg.reflow.steps + cfg.distill.steps
    folder = os.path.join(workdir, "controls", f"direct_{steps}")
    marker = os.path.join(folder, "done.json")
    if not os.path.isfile(marker):
        result = toy._distill(
            cfg,
            os.path.join(workdir, "controls"),
            f"direct_{steps}",
            "direct_distill",
            done["teacher"]["export"],
            done["teacher_triplets"]["folder"],
            init_output_sign=cfg.init_output_sign,
            num_steps=steps,
        )
        with open(marker, "w") as f:
            json.dump(result, f)
    with open(marker) as f:
        return json.load(f)["export"]


def evaluate_seed(
    cfg: Any, workdir: str, models: dict[str, str], guidance: dict[str, float], seed: int
) -> dict:
    """The toy evaluation on eval seed ``seed`` (the run's classifier reused); its results."""
    from instaflow_jax.examples.toy_eval import evaluate

    out = os.path.join(workdir, "controls", f"eval_seed{seed}")
    results_file = os.path.join(out, "eval", "results.json")
    if not os.path.isfile(results_file):
        os.makedirs(os.path.join(out, "eval"), exist_ok=True)
        shutil.copy(os.path.join(workdir, "eval", "classifier.msgpack"), os.path.join(out, "eval"))
        cfg = cfg.copy_and_resolve_references()
        cfg.eval.seed = seed
        evaluate(out, models, cfg, guidance)
    with open(results_file) as f:
        return json.load(f)


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
    args = parser.parse_args()
    toy.use_every_core()
    cfg = get_config(args.variant)
    stages = os.path.join(args.workdir, "stages")
    if not os.path.isfile(os.path.join(stages, "eval.json")):
        raise SystemExit(f"error: {args.workdir} has no finished run; run instaflow-toy --workdir first.")
    done = {}
    for name in toy.STAGES:
        with open(os.path.join(stages, f"{name}.json")) as f:
            done[name] = json.load(f)
    steps = cfg.reflow.steps + cfg.distill.steps
    models = {
        "teacher": done["teacher"]["export"],
        "2rf": done["reflow"]["export"],
        "2rf+distill": done["distill"]["export"],
        "direct distill": done["direct"]["export"],
        f"direct distill ({steps} steps)": matched_direct(cfg, args.workdir, done),
    }
    guidance = {name: 0.0 for name in models} | {"teacher": cfg.teacher.guidance, "2rf": cfg.reflow.guidance}
    per_seed = {seed: evaluate_seed(cfg, args.workdir, models, guidance, seed) for seed in args.seeds}
    if cfg.eval.seed not in per_seed:
        per_seed[cfg.eval.seed] = evaluate_seed(cfg, args.workdir, models, guidance, cfg.eval.seed)
    text = summarize(per_seed)
    with open(os.path.join(args.workdir, "controls", "summary.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
