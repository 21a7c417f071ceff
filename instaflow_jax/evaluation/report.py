"""``results.md``: an evaluation's scores and settings, beside the paper's numbers."""

from __future__ import annotations

from typing import Any

from instaflow_jax.files import atomic_open


def _number(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def render_report(results: dict[str, Any], paper: list[tuple[str, float, float | None]]) -> str:
    """Markdown: the scores, the settings, and the paper's rows for this protocol."""
    settings = results["settings"]
    lines = [
        f"# Evaluation: {settings['model']}",
        "",
        f"Protocol **{results['protocol']}**, {results['num_images']} prompts "
        f"(digest `{results['prompts_digest']}`)"
        + ("" if results["paper_protocol"] else "; not the paper's full protocol, not comparable to it")
        + ".",
        "",
        "| FID | CLIP score (cosine) | CLIP score (torchmetrics, 100·max(cos, 0)) | images/s |",
        "|---|---|---|---|",
        f"| {_number(results['fid'], 2)} | {_number(results['clip_score'], 4)} "
        f"| {_number(results['clip_score_torchmetrics'], 2)} | {_number(results['images_per_s'], 2)} |",
        "",
        "## Settings",
        "",
    ]
    lines += [f"- {key}: `{value}`" for key, value in settings.items()]
    lines += [f"- devices: {results['devices']} over {results['processes']} process(es)", ""]
    if paper:
        lines += [
            "## The paper's numbers (InstaFlow, MS COCO; CLIP score with ViT-g/14)",
            "",
            "| model | FID | CLIP score |",
            "|---|---|---|",
        ]
        lines += [f"| {name} | {fid:.2f} | {_number(clip, 3)} |" for name, fid, clip in paper]
        lines.append("")
    return "\n".join(lines)


def write_report(path: str, results: dict[str, Any], paper: list[tuple[str, float, float | None]]) -> str:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(render_report(results, paper))
    return path
