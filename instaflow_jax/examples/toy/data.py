"""A procedural text-to-image dataset: coloured shapes with size and position words.

Each sample draws a shape (circle, square, triangle), a colour (red, green, blue, yellow), a size
(small, large) and a position (top left, top right, bottom left, bottom right, center), renders it
anti-aliased on a dark background with small jitter, and writes a prompt that names the shape and
each other attribute with probability ``1 - omit_probability``: "a small red circle at the top
left", "a red circle", "a circle at the center" … A prompt that omits attributes stands for every
image that has the named ones, so conditional distributions are multi-modal (an unnamed position
is any of 5, an unnamed colour any of 4), which is what makes one-step generation hard.

Sample ``i`` of seed ``s`` is a pure function of (s, i): the dataset needs no files.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (0.9, 0.15, 0.1),
    "green": (0.15, 0.8, 0.2),
    "blue": (0.15, 0.3, 0.95),
    "yellow": (0.95, 0.85, 0.1),
}
SIZES = {"small": 0.14, "large": 0.24}  # radius as a fraction of the image side
POSITIONS = {
    "top left": (0.28, 0.28),
    "top right": (0.72, 0.28),
    "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72),
    "center": (0.5, 0.5),
}
ATTRIBUTES = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
}
VOCABULARY = ("a", "at", "the", *SHAPES, *COLORS, *SIZES, "top", "bottom", "left", "right", "center")
BACKGROUND = 0.08
# The trainer's ``data.images`` for this dataset (found by import path: data/images.py).
DATASET = "instaflow_jax.examples.toy.data:ToyShapes"


@dataclasses.dataclass(frozen=True)
class Sample:
    """Attribute indices (into ``ATTRIBUTES``) and which of them the prompt names."""

    labels: dict[str, int]
    named: dict[str, bool]

    @property
    def prompt(self) -> str:
        words = ["a"]
        if self.named["size"]:
            words.append(ATTRIBUTES["size"][self.labels["size"]])
        if self.named["color"]:
            words.append(ATTRIBUTES["color"][self.labels["color"]])
        words.append(ATTRIBUTES["shape"][self.labels["shape"]])
        if self.named["position"]:
            words += ["at", "the", ATTRIBUTES["position"][self.labels["position"]]]
        return " ".join(words)


def draw_sample(rng: np.random.Generator, omit_probability: float) -> Sample:
    labels = {name: int(rng.integers(len(values))) for name, values in ATTRIBUTES.items()}
    named = {name: name == "shape" or bool(rng.random() >= omit_probability) for name in ATTRIBUTES}
    return Sample(labels, named)


def render(sample: Sample, rng: np.random.Generator, size: int) -> np.ndarray:
    """float32 [size, size, 3] in [0, 1]: the shape, anti-aliased, with jitter and faint noise."""
    cx, cy = POSITIONS[ATTRIBUTES["position"][sample.labels["position"]]]
    cx, cy = (cx + rng.uniform(-0.04, 0.04)) * size, (cy + rng.uniform(-0.04, 0.04)) * size
    radius = SIZES[ATTRIBUTES["size"][sample.labels["size"]]] * size * rng.uniform(0.92, 1.08)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xs - cx, ys - cy
    shape = ATTRIBUTES["shape"][sample.labels["shape"]]
    if shape == "circle":
        distance = np.hypot(dx, dy) - radius
    elif shape == "square":
        distance = np.maximum(np.abs(dx), np.abs(dy)) - 0.85 * radius
    else:  # an upward triangle: intersection of three half-planes
        normals = [(0.0, 1.0), (np.sqrt(3) / 2, -0.5), (-np.sqrt(3) / 2, -0.5)]
        distance = np.max([nx * dx + ny * dy for nx, ny in normals], axis=0) - 0.55 * radius
    coverage = np.clip(0.5 - distance, 0.0, 1.0)[..., None]
    color = np.asarray(COLORS[ATTRIBUTES["color"][sample.labels["color"]]], np.float32)
    color = np.clip(color * rng.uniform(0.9, 1.1), 0.0, 1.0)
    image = BACKGROUND * (1 - coverage) + color * coverage
    image = image + rng.normal(0.0, 0.015, image.shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


class ToyShapes:
    """``num_images`` samples (0 = 100 000) of seed ``seed`` at ``height`` × ``width`` (square).

    ``read(indices)`` returns ``images`` float32 [k, H, W, 3] in [0, 1], ``prompt`` (k strings),
    ``index`` and ``labels`` / ``named`` (int / bool [k, 4] in ``ATTRIBUTES`` order).
    """

    def __init__(
        self,
        num_images: int = 0,
        seed: int = 0,
        height: int = 16,
        width: int = 16,
        omit_probability: float = 0.3,
    ):
        if height != width:
            raise ValueError(f"toy images are square, got {height}×{width}.")
        self.count, self.seed, self.size, self.omit = num_images or 100_000, seed, height, omit_probability

    def __len__(self) -> int:
        return self.count

    def sample(self, index: int) -> tuple[Sample, np.ndarray]:
        rng = np.random.default_rng([self.seed, int(index)])
        sample = draw_sample(rng, self.omit)
        return sample, render(sample, rng, self.size)

    def read(self, indices: np.ndarray) -> dict[str, Any]:
        samples, images = zip(*(self.sample(i) for i in np.asarray(indices)))
        return {
            "images": np.stack(images),
            "prompt": [s.prompt for s in samples],
            "index": np.asarray(indices, np.int64),
            "labels": np.asarray([[s.labels[a] for a in ATTRIBUTES] for s in samples], np.int32),
            "named": np.asarray([[s.named[a] for a in ATTRIBUTES] for s in samples], bool),
        }
