"""Condition images for ControlNets: Canny edge maps, computed like OpenCV's ``cv2.Canny``.

The canny ControlNets (``lllyasviel/control_v11p_sd15_canny``) were trained on
``cv2.Canny(image, 100, 200)`` of RGB uint8 images, repeated to three channels. :func:`canny`
computes the same map with numpy and scipy (no OpenCV): 3×3 Sobel gradients with replicated
borders, the L1 magnitude ``|dx| + |dy|`` (of the channel where it is largest), non-maximum
suppression along the gradient direction quantised with OpenCV's fixed-point tan(22.5°), and
hysteresis: pixels above ``high_threshold`` plus those above ``low_threshold`` 8-connected to them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

_SHIFT = 15
_TG22 = int(0.4142135623730950488016887242097 * (1 << _SHIFT) + 0.5)  # tan(22.5°) in Q15


def to_uint8_image(image: Any) -> np.ndarray:
    """uint8 array, or float in [0, 1] (rounded to 0–255), or a PIL image → uint8 [H, W(, C)]."""
    array = np.asarray(image)
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        return np.clip(np.round(array * 255.0), 0, 255).astype(np.uint8)
    raise ValueError(f"expected a uint8 or float image, got dtype {array.dtype}.")


def _sobel(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3×3 Sobel derivatives (x, y) of [H, W, C] int32 with replicated borders, as int32."""
    p = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
    dx = (p[:-2, 2:] - p[:-2, :-2]) + 2 * (p[1:-1, 2:] - p[1:-1, :-2]) + (p[2:, 2:] - p[2:, :-2])
    dy = (p[2:, :-2] - p[:-2, :-2]) + 2 * (p[2:, 1:-1] - p[:-2, 1:-1]) + (p[2:, 2:] - p[:-2, 2:])
    return dx, dy


def canny(image: Any, low_threshold: float = 100, high_threshold: float = 200) -> np.ndarray:
    """Canny edges of an image → uint8 [H, W, 3] with edges 255 and background 0 (a control image).

    Args:
      image: [H, W] grayscale or [H, W, 3] RGB, uint8 or float in [0, 1] (or a PIL image).
      low_threshold, high_threshold: hysteresis thresholds on the L1 Sobel magnitude (0–2040 for
        uint8 images), as in ``cv2.Canny``; the defaults are the canny ControlNets'.
    """
    array = to_uint8_image(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"canny expects an [H, W] or [H, W, 3] image, got shape {np.shape(image)}.")
    array = array[..., :3].astype(np.int32)
    low, high = sorted((float(low_threshold), float(high_threshold)))
    low, high = int(np.floor(low)), int(np.floor(high))

    dx, dy = _sobel(array)
    magnitudes = np.abs(dx) + np.abs(dy)
    channel = np.argmax(magnitudes, axis=-1)[..., None]  # first channel of largest magnitude
    dx = np.take_along_axis(dx, channel, -1)[..., 0].astype(np.int64)
    dy = np.take_along_axis(dy, channel, -1)[..., 0].astype(np.int64)
    m = np.take_along_axis(magnitudes, channel, -1)[..., 0]

    # Non-maximum suppression; magnitudes outside the image count as 0.
    mp = np.pad(m, 1)
    row = lambda di, dj: mp[1 + di : mp.shape[0] - 1 + di, 1 + dj : mp.shape[1] - 1 + dj]
    x, y = np.abs(dx), np.abs(dy) << _SHIFT
    tg22x = x * _TG22
    horizontal = y < tg22x
    vertical = ~horizontal & (y > tg22x + (x << (_SHIFT + 1)))
    diagonal = ~horizontal & ~vertical
    same_sign = (dx < 0) == (dy < 0)
    diag_max = np.where(
        same_sign,
        (m > row(-1, -1)) & (m > row(1, 1)),
        (m > row(-1, 1)) & (m > row(1, -1)),
    )
    local_max = (
        (horizontal & (m > row(0, -1)) & (m >= row(0, 1)))
        | (vertical & (m > row(-1, 0)) & (m >= row(1, 0)))
        | (diagonal & diag_max)
    )
    candidates = local_max & (m > low)
    strong = candidates & (m > high)

    # Hysteresis: keep 8-connected groups of candidates that contain a strong pixel.
    labels, _ = ndimage.label(candidates, structure=np.ones((3, 3), bool))
    keep = np.zeros(labels.max() + 1, bool)
    keep[np.unique(labels[strong])] = True
    keep[0] = False
    edges = np.where(keep[labels], 255, 0).astype(np.uint8)
    return np.repeat(edges[..., None], 3, axis=-1)
