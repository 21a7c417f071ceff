"""ControlNets for the pipelines: loading a diffusers ControlNet folder, preparing condition images.

``cn = load_controlnet("control_v11p_sd15_canny", dtype="bfloat16")`` reads a ``ControlNetModel``
folder (``config.json`` and weights, as ``lllyasviel`` publishes them) and places its params on
the devices; ``Pipeline.generate(..., controlnet=cn, control_image=img, controlnet_scale=1.0)``
runs it at every step with the UNet's own timestep and text context.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from instaflow_jax.models.controlnet import ControlNetModel
from instaflow_jax.parallel import make_mesh, replicated
from instaflow_jax.weights.folder import load_component


@dataclasses.dataclass
class ControlNet:
    """A Flax ``ControlNetModel`` and its params (replicated over ``mesh``)."""

    module: ControlNetModel
    params: Any
    source: str | None = None
    mesh: Mesh | None = None

    def __post_init__(self) -> None:
        self.mesh = self.mesh or make_mesh()
        self.params = jax.device_put(self.params, replicated(self.mesh))

    @property
    def config(self) -> Any:
        return self.module.config


def load_controlnet(
    path: str,
    dtype: Any = "float32",
    param_dtype: Any = "float32",
    variant: str | None = None,
    attention_impl: str | None = None,
    mesh: Mesh | None = None,
) -> ControlNet:
    """Load a diffusers ``ControlNetModel`` folder for SD 1.x (e.g. ``lllyasviel/control_v11p_sd15_canny``).

    Args:
      path: a folder with ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or
        ``.bin``, or a Flax ``diffusion_flax_model.msgpack``), or a Hugging Face repo id already
        in the local cache.
      dtype: compute dtype (``"bfloat16"`` on accelerators); param_dtype: storage dtype.
      variant: weights variant, e.g. ``"fp16"``.
      attention_impl: ``None`` (auto), ``"xla"`` or ``"cudnn"``.
      mesh: devices to replicate the params on (default: all local devices).
    """
    folder = _resolve(path)
    module, params = load_component(
        folder, "controlnet", dtype, param_dtype, variant, attention_impl=attention_impl
    )
    return ControlNet(module, params, folder, mesh)


def _resolve(path: str) -> str:
    path = os.path.expanduser(os.fspath(path))
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise FileNotFoundError(
            f"{path} is a file; expected a diffusers ControlNet folder (config.json and "
            "diffusion_pytorch_model.safetensors), e.g. `hf download lllyasviel/control_v11p_sd15_canny "
            "--local-dir DIR`."
        )
    from instaflow_jax.weights.pipeline_folder import resolve_folder

    try:
        return resolve_folder(path)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{path}: no such ControlNet folder (nor a cached Hugging Face repo id). Expected a diffusers "
            "ControlNetModel folder with config.json and diffusion_pytorch_model.safetensors."
        ) from err


def control_image_array(
    image: Any, batch: int, height: int, width: int, what: str = "control_image"
) -> np.ndarray:
    """A condition image as diffusers takes it → float32 [batch, height, width, 3] in [0, 1], NHWC.

    Accepts a PIL image, uint8 (0–255) or float ([0, 1]) arrays [H, W, 3] or [B, H, W, 3] (one
    image is used for every prompt; grayscale [H, W] becomes RGB). The size must equal the
    requested ``height × width``: resize beforehand (e.g. ``PIL.Image.resize``).
    """
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"{what} must be [H, W, 3] or [B, H, W, 3] (NHWC, RGB), got shape {np.shape(image)}; "
            "transpose NCHW arrays to NHWC."
        )
    array = np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array[..., :3]
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    elif np.issubdtype(array.dtype, np.floating) or array.dtype == np.bool_:
        array = array.astype(np.float32)
        if array.size and (array.min() < 0.0 or array.max() > 1.0):
            raise ValueError(
                f"{what}: float images must lie in [0, 1], found values in [{array.min():.3g}, "
                f"{array.max():.3g}]; pass uint8 for 0–255 images."
            )
    else:
        raise ValueError(f"{what}: expected uint8 or float pixels, got dtype {array.dtype}.")
    if array.shape[1:3] != (height, width):
        raise ValueError(
            f"{what} is {array.shape[1]}×{array.shape[2]} (H×W) but the images are {height}×{width}; "
            "resize it first or pass a matching height and width."
        )
    if array.shape[0] == 1:
        return np.ascontiguousarray(np.broadcast_to(array, (batch,) + array.shape[1:]))
    if array.shape[0] != batch:
        raise ValueError(f"{what} holds {array.shape[0]} images for {batch} prompts; give one or one each.")
    return array


def as_list(value: Any, n: int | None, what: str) -> list:
    """One item or a list/tuple of items → a list (of length ``n`` when given)."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if n is not None and len(items) != n:
        raise ValueError(f"{len(items)} {what} for {n} ControlNet(s); give one each.")
    return items


def _is_sequence_of_images(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and not isinstance(value, (str, bytes))


def control_inputs(
    controlnet: ControlNet | Sequence[ControlNet],
    control_image: Any,
    controlnet_scale: float | Sequence[float],
    batch: int,
    height: int,
    width: int,
) -> tuple[list[ControlNet], list[np.ndarray], np.ndarray]:
    """Normalise ``generate``'s ControlNet arguments: (nets, images [B, H, W, 3] each, scales [n])."""
    nets = as_list(controlnet, None, "ControlNets")
    for net in nets:
        if not isinstance(net, ControlNet):
            raise TypeError(
                "controlnet must be a ControlNet from instaflow_jax.load_controlnet, got "
                f"{type(net).__name__}."
            )
    if control_image is None:
        raise ValueError("controlnet needs control_image (the condition image, e.g. a canny edge map).")
    if len(nets) == 1:  # a list is the batch (one image per prompt), as in diffusers
        if _is_sequence_of_images(control_image):
            control_image = np.stack([np.asarray(image) for image in control_image])
        images = [control_image]
    else:
        if not _is_sequence_of_images(control_image):
            raise ValueError(f"{len(nets)} ControlNets need a list of {len(nets)} control images, one each.")
        images = as_list(control_image, len(nets), "control images")
    arrays = [
        control_image_array(
            image, batch, height, width, f"control_image[{i}]" if len(nets) > 1 else "control_image"
        )
        for i, image in enumerate(images)
    ]
    scales = np.asarray(as_list(controlnet_scale, None, "scales"), np.float32)
    if scales.size == 1:
        scales = np.repeat(scales, len(nets))
    if scales.shape != (len(nets),):
        raise ValueError(
            f"{scales.size} controlnet_scale values for {len(nets)} ControlNet(s); give one or one each."
        )
    return nets, arrays, scales
