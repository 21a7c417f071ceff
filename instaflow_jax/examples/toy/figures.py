"""Figures of the small-scale reproduction: sample grid, quality against steps, straightness.

Each function saves one PNG and returns the (closed) matplotlib ``Figure``, whose axes and texts
stay readable, so tests check labels on objects rather than pixels.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_samples(prompts: Sequence[str], rows: Mapping[str, np.ndarray], path: str) -> Any:
    """One image per cell: a column per prompt (the prompt, wrapped, above it), a row per model
    (its full name at the left). ``rows`` maps label → images [len(prompts), H, W, 3] in [0, 1]."""
    plt = _pyplot()
    columns = len(prompts)
    fig, axes = plt.subplots(
        len(rows),
        columns,
        figsize=(2.0 + 1.0 * columns, 0.6 + 1.0 * len(rows)),
        squeeze=False,
        gridspec_kw={"wspace": 0.06, "hspace": 0.06},
    )
    for r, (label, images) in enumerate(rows.items()):
        for c in range(columns):
            ax = axes[r, c]
            ax.imshow(np.clip(images[c], 0.0, 1.0), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    for c, prompt in enumerate(prompts):
        axes[0, c].set_title(textwrap.fill(prompt, 16), fontsize=6.5)
    fig.savefig(path, dpi=150, bbox_inches="tight")  # "tight": no row label or title is cut
    plt.close(fig)
    return fig


def _save(plt: Any, fig: Any, path: str) -> None:
    """Lay out, write at 120 dpi and free ``fig``."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_quality_vs_steps(results: dict[str, Any], path: str) -> Any:
    """FID against sampling steps per flow, distilled students as stars, the real-data floor dashed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    # A distilled student shares its colour with the flow its targets came from.
    colours = {
        "teacher": "tab:blue",
        "direct distill": "tab:blue",
        "2rf": "tab:orange",
        "2rf+distill": "tab:orange",
    }
    for name in ("teacher", "2rf"):
        points = sorted((r["steps"], r["fid"]) for r in results["rows"] if r["model"] == name)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name, color=colours[name])
    for row in results["rows"]:
        if row["model"] not in ("teacher", "2rf", "real images"):
            ax.scatter(
                [1],
                [row["fid"]],
                marker="*",
                s=110,
                label=f"{row['model']} (1 step)",
                zorder=3,
                color=colours.get(row["model"], "tab:green"),
                edgecolors="black",
            )
    real = [r["fid"] for r in results["rows"] if r["model"] == "real images"]
    if real:
        ax.axhline(real[0], color="gray", linestyle="--", linewidth=1, label="real vs real (floor)")
    ax.set_xscale("log")
    steps = sorted({r["steps"] for r in results["rows"] if r["steps"] > 0})
    ax.set_xticks(steps, [str(s) for s in steps])  # the step counts evaluated, not powers of ten
    ax.minorticks_off()
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("FID (classifier features) ↓")
    ax.set_title("quality against sampling steps")
    ax.legend(fontsize=7)
    _save(plt, fig, path)
    return fig


def plot_straightness(flows: Mapping[str, Mapping[str, Any]], path: str) -> Any:
    """Left: straightness S per flow. Right: the velocity change between consecutive solver
    steps, plotted at the time where they meet; the teacher's last step (its last discrete
    timestep straight to the image) is shaded, since no step boundary lies inside it."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    names = list(flows)
    left.bar(names, [flows[n]["straightness"] for n in names], color=["tab:blue", "tab:orange"][: len(names)])
    left.set_ylabel("straightness S (lower = straighter)")
    left.set_xlabel("flow")
    left.set_title("straightness S (docs/method.md §5)")
    for name in names:
        times = np.asarray(flows[name]["times"])
        right.plot(times[1:-1], flows[name]["velocity_change"], marker=".", label=name)
    if "teacher" in flows:
        times = np.asarray(flows["teacher"]["times"])
        right.axvspan(times[-2], times[-1], color="tab:blue", alpha=0.12, lw=0)
        right.text(
            (times[-2] + times[-1]) / 2,
            0.5,
            f"teacher's last step\n(t {times[-2]:.2f} → 1):\nno step boundary\ninside it",
            transform=right.get_xaxis_transform(),
            ha="center",
            va="center",
            fontsize=6.5,
            color="tab:blue",
        )
    right.set_xlim(0.0, 1.0)
    right.set_yscale("log")
    right.set_xlabel("t (0 = noise, 1 = image)")
    right.set_ylabel(r"mean $\|v_{k+1} - v_k\|^2$ between steps")
    right.set_title("per-step velocity change")
    right.legend(fontsize=8)
    _save(plt, fig, path)
    return fig
