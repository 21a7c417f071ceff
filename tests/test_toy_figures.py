"""The toy's figures: every label set, prompts above their columns, the teacher's last step explained."""

from __future__ import annotations

import numpy as np
from PIL import Image

from instaflow_jax.examples.toy.figures import plot_quality_vs_steps, plot_samples, plot_straightness


def test_samples_have_a_prompt_per_column_and_full_row_labels(tmp_path):
    prompts = ["a large blue triangle at the bottom left", "a red circle", "a small square at the top"]
    rng = np.random.default_rng(0)
    rows = {name: rng.random((3, 16, 16, 3)) for name in ("real images", "rect distill (1 step)")}
    fig = plot_samples(prompts, rows, str(tmp_path / "samples.png"))
    assert Image.open(tmp_path / "samples.png").format == "PNG"
    axes = np.array(fig.axes).reshape(2, 3)
    titles = [" ".join(ax.get_title().split()) for ax in axes[0]]  # wrapped: newlines → spaces
    assert titles == prompts and "\n" in axes[0, 0].get_title()
    assert [ax.get_ylabel() for ax in axes[:, 0]] == list(rows)
    assert all(len(ax.get_images()) == 1 for ax in axes.flat)  # one image per cell, no strip
    np.testing.assert_allclose(axes[1, 2].get_images()[0].get_array(), rows["rect distill (1 step)"][2])


def test_plots_label_every_axis_and_explain_the_teachers_last_step(tmp_path):
    results = {
        "rows": [
            {"model": "real images", "steps": 0, "fid": 20.0},
            {"model": "teacher", "steps": 1, "fid": 900.0},
            {"model": "teacher", "steps": 4, "fid": 400.0},
            {"model": "2rf", "steps": 1, "fid": 500.0},
            {"model": "2rf", "steps": 4, "fid": 420.0},
            {"model": "2rf+distill", "steps": 1, "fid": 390.0},
        ]
    }
    fig = plot_quality_vs_steps(results, str(tmp_path / "q.png"))
    (ax,) = fig.axes
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "4"]
    teacher_times = [0.0, 0.3, 0.6, 0.83, 1.0]  # the last step jumps from t = 0.83 to the image
    flows = {
        "teacher": {"straightness": 0.1, "velocity_change": [1.0, 0.1, 0.01], "times": teacher_times},
        "2rf": {"straightness": 0.01, "velocity_change": [0.02] * 3, "times": [0, 0.25, 0.5, 0.75, 1]},
    }
    fig = plot_straightness(flows, str(tmp_path / "s.png"))
    for ax in fig.axes:
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title(), ax
    right = fig.axes[1]
    assert right.get_xlim() == (0.0, 1.0)
    notes = [t.get_text() for t in right.texts]
    assert any("last step" in n and "0.83" in n for n in notes), notes
    assert Image.open(tmp_path / "s.png").format == "PNG" and (tmp_path / "q.png").exists()
