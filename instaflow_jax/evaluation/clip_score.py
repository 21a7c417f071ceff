"""CLIP score: image preprocessing, per-pair cosine similarity and the two reporting conventions.

- :func:`clip_score`: the mean cosine similarity of image and caption embeddings, the convention
  of the InstaFlow paper (≈ 0.30 with ViT-g/14 on MS COCO);
- :func:`torchmetrics_clip_score`: torchmetrics' ``CLIPScore``, ``max(100 · mean(cos), 0)``.

:func:`clip_preprocess` and :func:`clip_cosine` are pure float32 JAX (jit them, shard them over the
batch); the two scores reduce a whole evaluation's cosines on the host, in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from instaflow_jax.weights.clip_model import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) with the shorter side ``size`` and the longer ``int(size · long / short)``:
    transformers' ``get_resize_output_image_size(..., default_to_square=False)``."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def clip_preprocess(
    images: jax.Array,
    size: int = 224,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
    crop_size: int | None = None,
) -> jax.Array:
    """Images float NHWC in [0, 1] → CLIP ``pixel_values`` NHWC float32 [B, crop, crop, C].

    The shorter side is resized to ``size`` with antialiased bicubic interpolation (Keys a = -0.5,
    the kernel widened by the downscale factor: PIL's ``BICUBIC`` filter), in PIL's two passes
    (width, then height), each clipped to [0, 1] as PIL clips 8-bit pixels; a centred
    ``crop_size``² (default ``size``²) is cut with transformers' offsets ``(new - crop) // 2``, and
    each channel becomes ``(x - mean) / std``. ``size``, ``crop_size`` and the image shape must be
    static under jit.

    Difference from transformers' ``CLIPImageProcessor``: the processor quantises where we stay in
    float. Its PIL backend (``CLIPImageProcessorPil``) converts the image to 8 bits and rounds
    after each pass; on 8-bit inputs we match it to within one 8-bit level (≤ 0.015 after
    normalisation, mean ≈ 0.005; exactly if each pass is rounded to 8 bits; measured in
    tests/test_clip_model.py). Its torchvision backend (transformers ≥ 5's default) runs torch's
    antialiased bicubic in one 2-D pass (same filter: ``jax.image.resize`` agrees with it and
    with PIL to ~1e-5 on float images) and clips and rounds only at the end, so on sharp 8-bit
    images it differs from PIL, and from us, by a few levels where the overshoot of the two
    passes differs (not measured: torchvision is not a dependency). Feed 8-bit-rounded images
    (``round(x · 255) / 255``) to be closest to the processor's input. An image already of the
    resized shape is not resampled.
    """
    crop = size if crop_size is None else crop_size
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be NHWC [B, H, W, C] in [0, 1], got shape {images.shape}.")
    batch, height, width, channels = images.shape
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean {tuple(mean)} and std {tuple(std)} need one value per channel ({channels}).")
    new_h, new_w = resized_shape(height, width, size)
    if crop > min(new_h, new_w):
        raise ValueError(f"crop_size {crop} is larger than the resized image {new_h}×{new_w}.")
    # PIL's order: width, then height, each pass's bicubic overshoot clipped (as 8-bit pixels are).
    if new_w != width:
        images = jax.image.resize(images, (batch, height, new_w, channels), "bicubic", antialias=True)
        images = jnp.clip(images, 0.0, 1.0)
    if new_h != height:
        images = jax.image.resize(images, (batch, new_h, new_w, channels), "bicubic", antialias=True)
        images = jnp.clip(images, 0.0, 1.0)
    top, left = (new_h - crop) // 2, (new_w - crop) // 2
    images = images[:, top : top + crop, left : left + crop]
    mean_ = jnp.asarray(mean, jnp.float32)
    std_ = jnp.asarray(std, jnp.float32)
    return (images - mean_) / std_


def clip_cosine(image_embeds: jax.Array, text_embeds: jax.Array) -> jax.Array:
    """Per-pair cosine similarity [B] of image and caption embeddings [B, P] (float32).

    The projected features are divided by their L2 norms as in transformers / torchmetrics (no
    epsilon: an all-zero embedding gives NaN, which the caller's finiteness check reports).
    """
    image_embeds = jnp.asarray(image_embeds, jnp.float32)
    text_embeds = jnp.asarray(text_embeds, jnp.float32)
    if image_embeds.shape != text_embeds.shape or image_embeds.ndim != 2:
        raise ValueError(
            "image and text embeddings must both be [B, P]; got "
            f"{image_embeds.shape} and {text_embeds.shape}."
        )
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    return jnp.sum(unit(image_embeds) * unit(text_embeds), axis=-1)


def _host_cosines(cosines: jax.Array | np.ndarray | Sequence[float]) -> np.ndarray:
    values = np.asarray(jax.device_get(cosines), np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError("no cosine similarities to average (an empty evaluation).")
    return values


def clip_score(cosines: jax.Array | np.ndarray | Sequence[float]) -> float:
    """The paper's CLIP score: the mean cosine similarity over all image-caption pairs (≈ 0.30)."""
    return float(np.mean(_host_cosines(cosines)))


def torchmetrics_clip_score(cosines: jax.Array | np.ndarray | Sequence[float]) -> float:
    """torchmetrics' ``CLIPScore`` on the same pairs: ``max(100 · mean(cos), 0)`` (≈ 30).

    torchmetrics' docstring writes ``max(100 · cos, 0)`` per pair, but its code (1.9:
    ``clip_score`` and ``CLIPScore.compute``) averages ``100 · cos`` over the pairs first and clamps
    the mean at 0; this follows the code. The two agree unless some pair has a negative cosine.
    """
    return float(max(100.0 * np.mean(_host_cosines(cosines)), 0.0))
