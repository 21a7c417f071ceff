"""Load a transformers ``CLIPModel`` folder (e.g. ``openai/clip-vit-large-patch14``,
``laion/CLIP-ViT-g-14-laion2B-s12B-b42K``) into :class:`instaflow_jax.models.clip_vision.CLIPModel`.

The folder holds ``config.json`` (``text_config``, ``vision_config``, ``projection_dim``,
``logit_scale_init_value``), weights as ``model.safetensors``, a sharded
``model.safetensors.index.json``, transformers-Flax ``flax_model.msgpack`` or ``pytorch_model.bin``
(or its ``.bin.index.json``; needs torch), tried in that order (as ``weights.folder.find_weights``);
``preprocessor_config.json`` (image size, crop, mean and std; OpenAI CLIP's values when absent)
and the tokenizer files (``vocab.json`` + ``merges.txt`` or ``tokenizer.json``), read with
transformers' ``CLIPTokenizer``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from instaflow_jax.files import contained_path, read_json
from instaflow_jax.models.clip_vision import CLIPConfig, CLIPModel
from instaflow_jax.precision import parse_dtype
from instaflow_jax.text import load_tokenizer
from instaflow_jax.weights.convert import (
    DROPPED_KEYS,
    Path,
    WeightsMismatchError,
    _leaf_to_flax,
    check_tree,
    flatten,
    unflatten,
)
from instaflow_jax.weights.folder import _hub_blobs, _torch_load, read_msgpack, read_state_dict

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "flax_model.msgpack",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# OpenAI CLIP's preprocessing (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD, 224 px, bicubic).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_BICUBIC = 3  # PIL.Image.BICUBIC, the ``resample`` of CLIP's image processor
_HINT = (
    "Point at a local copy of a full transformers CLIPModel repository, e.g. "
    "`huggingface-cli download openai/clip-vit-large-patch14 --local-dir DIR` (or "
    "laion/CLIP-ViT-g-14-laion2B-s12B-b42K)."
)
_MISMATCH_HINT = (
    "Check that config.json belongs to these weights and that they are a transformers CLIPModel "
    "checkpoint (both towers and projections; not CLIPTextModel, CLIPVisionModel or open_clip). " + _HINT
)
_REDOWNLOAD = "Download the CLIP model folder again (or restore the file)."


@dataclasses.dataclass(frozen=True)
class CLIPPreprocessConfig:
    """What ``evaluation.clip_score.clip_preprocess`` needs: shorter side resized to ``size``
    (bicubic), centre crop ``crop_size``², then ``(x - image_mean) / image_std`` per channel."""

    size: int = 224
    crop_size: int = 224
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD


def _edge(value: Any, keys: tuple[str, ...], what: str, source: str) -> int:
    """An int, or a transformers size dict ({"shortest_edge": n} / {"height": n, "width": n})."""
    if isinstance(value, dict):
        found = [value[k] for k in keys if k in value]
        if not found or any(v != found[0] for v in found):
            raise ValueError(
                f"{source}: {what} {value!r} is not square or has none of {list(keys)}; CLIP "
                "preprocessing resizes the shorter side and crops a square."
            )
        value = found[0]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{source}: {what} must be a positive integer, got {value!r}.")
    return value


def read_preprocess_config(folder: str) -> CLIPPreprocessConfig:
    """``preprocessor_config.json`` of a CLIP folder (OpenAI CLIP's values when it is absent)."""
    path = os.path.join(folder, "preprocessor_config.json")
    if not os.path.isfile(path):
        return CLIPPreprocessConfig()
    raw = read_json(path, _REDOWNLOAD)
    default = CLIPPreprocessConfig()
    size = _edge(raw.get("size", default.size), ("shortest_edge", "height", "width"), "size", path)
    crop = _edge(raw.get("crop_size", size), ("height", "width"), "crop_size", path)
    mean = tuple(float(v) for v in raw.get("image_mean", default.image_mean))
    std = tuple(float(v) for v in raw.get("image_std", default.image_std))
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"{path}: image_mean {mean} and image_std {std} must hold 3 values, std > 0.")
    resample = raw.get("resample", _BICUBIC)
    if resample != _BICUBIC:
        warnings.warn(
            f"{path}: resample={resample!r}, but clip_preprocess always resizes bicubically "
            f"(PIL code {_BICUBIC}); scores may differ slightly from transformers'.",
            stacklevel=2,
        )
    for flag in ("do_resize", "do_center_crop", "do_normalize"):
        if raw.get(flag, True) is False:
            warnings.warn(f"{path}: {flag}=false is ignored; clip_preprocess always does it.", stacklevel=2)
    return CLIPPreprocessConfig(size=size, crop_size=crop, image_mean=mean, image_std=std)


def read_clip_config(folder: str) -> CLIPConfig:
    """Parse and check ``folder/config.json`` of a transformers CLIPModel."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such folder (expected a CLIPModel folder). {_HINT}")
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing; a transformers CLIPModel folder needs it. {_HINT}")
    return CLIPConfig.from_dict(read_json(path, _REDOWNLOAD), source=path)


def find_clip_weights(folder: str) -> str:
    """The first of ``WEIGHT_FILES`` present in ``folder``."""
    for name in WEIGHT_FILES:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    present = sorted(os.listdir(folder))
    raise FileNotFoundError(
        f"{folder}: no CLIP weights found; looked for {list(WEIGHT_FILES)}, the folder holds "
        f"{present}. open_clip checkpoints (open_clip_pytorch_model.bin) use other names: download "
        f"the transformers files of the repository. {_HINT}"
    )


def _read_bin_index(path: str) -> dict[str, np.ndarray]:
    weight_map = read_json(path, _REDOWNLOAD).get("weight_map")
    if not weight_map or not isinstance(weight_map, dict):
        raise ValueError(f"{path}: no weight_map in the shard index. {_REDOWNLOAD}")
    folder, state = os.path.dirname(path), {}
    for shard in sorted(set(map(str, weight_map.values()))):
        shard_path = os.fspath(contained_path(folder, shard, path, _hub_blobs(folder)))
        if not os.path.isfile(shard_path):
            raise FileNotFoundError(f"{path} lists shard {shard}, which is missing. {_REDOWNLOAD}")
        state.update(_torch_load(shard_path))
    return state


def clip_torch_to_flax(state_dict: Mapping[str, np.ndarray]) -> dict[Path, np.ndarray]:
    """transformers ``CLIPModel`` state dict → flat Flax dict in :class:`CLIPModel`'s layout.

    Linear weights are transposed, the patch convolution goes OIHW → HWIO, token/position embedding
    tables become ``embedding``, LayerNorm weights ``scale``; ``class_embedding`` and
    ``logit_scale`` keep their names; ``position_ids`` buffers of old checkpoints are dropped.
    """
    flat: dict[Path, np.ndarray] = {}
    for key, tensor in state_dict.items():
        if DROPPED_KEYS.search(key):
            continue
        parts = key.split(".")
        value = np.asarray(tensor)
        if parts[-1] in ("weight", "bias") and len(parts) > 1:
            table = parts[-2] in ("token_embedding", "position_embedding")
            path, value = _leaf_to_flax(parts, value, table)
        else:  # class_embedding, logit_scale (or an unknown key, reported by the check)
            path = tuple(parts)
        if path in flat:
            raise WeightsMismatchError(f"two checkpoint tensors map to {'/'.join(path)} (e.g. {key}).")
        flat[path] = value
    return flat


def read_clip_weights(path: str) -> dict[Path, np.ndarray]:
    """Flat Flax dict from any of ``WEIGHT_FILES``."""
    if path.endswith(".msgpack"):
        return read_msgpack(path)
    if path.endswith(".bin.index.json"):
        return clip_torch_to_flax(_read_bin_index(path))
    return clip_torch_to_flax(read_state_dict(path))


@functools.lru_cache(maxsize=8)
def expected_shapes(model: CLIPModel) -> dict[Path, Any]:
    """Flat ``jax.eval_shape`` of the model's params (traced once per model)."""
    config = model.config
    pixels = jnp.zeros((1, config.vision.image_size, config.vision.image_size, config.vision.num_channels))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32), pixels)
    return flatten(shapes["params"])


def load_clip_model(
    folder: str,
    dtype: Any = "float32",
    param_dtype: Any = "float32",
    attention_impl: str | None = "auto",
) -> tuple[CLIPModel, dict, CLIPPreprocessConfig]:
    """Build :class:`CLIPModel` from a transformers CLIPModel folder and load its checked params.

    Args:
      folder: local folder with config.json, weights, preprocessor_config.json, tokenizer files.
      dtype: compute dtype (features come out in float32 anyway); param_dtype: params are cast to it.
      attention_impl: see :mod:`instaflow_jax.models.attention`.
    Returns:
      (model, params, preprocess config); params a nested dict of numpy arrays. The tokenizer:
      :func:`load_clip_tokenizer`.
    Raises:
      FileNotFoundError (no folder, config.json or weights), ConfigError (not a CLIPModel config),
      WeightsMismatchError (missing, unexpected or mis-shaped weights, a few named).
    """
    config = read_clip_config(folder)
    model = CLIPModel(
        config, dtype=parse_dtype(dtype), param_dtype=parse_dtype(param_dtype), attention_impl=attention_impl
    )
    path = find_clip_weights(folder)
    flat = read_clip_weights(path)
    check_tree(flat, expected_shapes(model), source=path, hint=_MISMATCH_HINT)
    target = np.dtype(parse_dtype(param_dtype))
    params = unflatten({k: np.asarray(v).astype(target, copy=False) for k, v in flat.items()})
    return model, params, read_preprocess_config(folder)


def load_clip_tokenizer(folder: str) -> Any:
    """transformers ``CLIPTokenizer`` from the CLIP folder (offline). Pad captions to the text
    model's ``max_position_embeddings`` (77) with ``instaflow_jax.text.tokenize``."""
    try:
        return load_tokenizer(folder)
    except FileNotFoundError as err:  # load_tokenizer's message speaks of a diffusers tokenizer/ folder
        raise FileNotFoundError(
            f"{err} Download the tokenizer files of the CLIP repository into {folder}."
        ) from None
