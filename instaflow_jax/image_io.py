"""Saving what people look at: PNGs, grids and animated GIFs from float images in [0, 1]."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from instaflow_jax.files import atomic_open


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float [..., H, W, 3] in [0, 1] → uint8 (rounded, clipped)."""
    return np.clip(np.round(np.asarray(images, np.float32) * 255.0), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """[B, H, W, 3] → one [rows·(H+pad)−pad, cols·(W+pad)−pad, 3] image, white gaps."""
    images = np.asarray(images, np.float32)
    count, height, width, channels = images.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = np.ones((rows * (height + pad) - pad, columns * (width + pad) - pad, channels), np.float32)
    for i, image in enumerate(images):
        top, left = (i // columns) * (height + pad), (i % columns) * (width + pad)
        grid[top : top + height, left : left + width] = image
    return grid


def save_png(path: str, image: np.ndarray) -> str:
    """Write one [H, W, 3] float image in [0, 1] as PNG (parent folders are created; atomic)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image_format = Image.registered_extensions().get(os.path.splitext(path)[1].lower(), "PNG")
    with atomic_open(path) as f:  # the format comes from the name, as PIL's own save does
        Image.fromarray(to_uint8(image)).save(f, format=image_format)
    return path


def save_gif(path: str, frames: Sequence[np.ndarray], duration_ms: int = 100) -> str:
    """Write float frames [H, W, 3] in [0, 1] as a looping animated GIF."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pictures = [Image.fromarray(to_uint8(frame)) for frame in frames]
    with atomic_open(path) as f:
        pictures[0].save(
            f, format="GIF", save_all=True, append_images=pictures[1:], duration=duration_ms, loop=0
        )
    return path
