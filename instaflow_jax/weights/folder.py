"""Read and write one component folder of a diffusers pipeline (``unet/``, ``vae/``, ``text_encoder/``).

A component folder holds ``config.json`` and weights in one of these forms, tried in this order:
``<stem>[.<variant>].safetensors`` (read with numpy, no torch), a sharded
``<stem>[.<variant>].safetensors.index.json``, the Flax ``*.msgpack`` of diffusers/transformers,
or ``<stem>[.<variant>].bin`` (needs torch). Trees are returned as numpy arrays in
``param_dtype``; placing them on devices is the caller's job.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from instaflow_jax.files import contained_path, read_json, write_bytes_atomic, write_json_atomic
from instaflow_jax.models import (
    AutoencoderKL,
    CLIPTextConfig,
    CLIPTextModel,
    UNet2DConditionModel,
    UNetConfig,
    VAEConfig,
)
from instaflow_jax.models.controlnet import ControlNetConfig, ControlNetModel
from instaflow_jax.models.identity_vae import IdentityAutoencoder, IdentityVAEConfig
from instaflow_jax.precision import parse_dtype
from instaflow_jax.weights import safetensors_io
from instaflow_jax.weights.convert import (
    check_tree,
    flatten,
    flax_to_torch,
    torch_to_flax,
    unflatten,
)

REDOWNLOAD = "Download or save the model folder again (or restore the file)."


@dataclasses.dataclass(frozen=True)
class ComponentSpec:
    """How to build, check and name the files of one kind of component."""

    family: str  # "unet", "vae" or "clip" (conversion rules)
    config_cls: type  # the default: a config.json naming another class is refused by its from_dict
    module_cls: type
    torch_stems: tuple[str, ...]  # file stems of PyTorch weights, preferred first
    msgpack_name: str
    dummy_inputs: Callable[[Any], tuple]
    # Other classes a folder of this kind may hold, by the ``_class_name`` of its config.json
    # (keys of ``MODEL_CLASSES``).
    other_classes: tuple[str, ...] = ()

    def expected_shapes(self, module: Any) -> dict:
        return dict(_expected_shapes(self, module))  # modules are hashable: traced once each


@functools.lru_cache(maxsize=64)
def _expected_shapes(spec: ComponentSpec, module: Any) -> dict:
    shapes = jax.eval_shape(module.init, jax.random.key(0), *spec.dummy_inputs(module.config))
    return flatten(shapes.get("params", {}))  # parameter-free components have none


def _unet_inputs(c: UNetConfig) -> tuple:
    side = 2 ** (len(c.block_out_channels) - 1)
    return (
        jnp.zeros((1, side, side, c.in_channels)),
        jnp.ones((1,)),
        jnp.zeros((1, 1, c.cross_attention_dim)),
    )


def _controlnet_inputs(c: ControlNetConfig) -> tuple:
    side = 2 ** (len(c.block_out_channels) - 1)
    cond = side * c.condition_downsample
    return (
        jnp.zeros((1, side, side, c.in_channels)),
        jnp.ones((1,)),
        jnp.zeros((1, 1, c.cross_attention_dim)),
        jnp.zeros((1, cond, cond, c.conditioning_channels)),
    )


# Flax module and config classes by the class name a component's ``config.json`` carries
# (``_class_name``): diffusers' and transformers' names, and
# instaflow_jax's own parameter-free ``IdentityAutoencoder`` for pixel-space pipelines.
MODEL_CLASSES: dict[str, tuple[type, type]] = {
    config_cls.CLASS_NAMES[0]: (module_cls, config_cls)
    for module_cls, config_cls in (
        (UNet2DConditionModel, UNetConfig),
        (AutoencoderKL, VAEConfig),
        (IdentityAutoencoder, IdentityVAEConfig),
        (CLIPTextModel, CLIPTextConfig),
        (ControlNetModel, ControlNetConfig),
    )
}

SPECS: dict[str, ComponentSpec] = {
    "unet": ComponentSpec(
        "unet",
        UNetConfig,
        UNet2DConditionModel,
        ("diffusion_pytorch_model",),
        "diffusion_flax_model.msgpack",
        _unet_inputs,
    ),
    "vae": ComponentSpec(
        "vae",
        VAEConfig,
        AutoencoderKL,
        ("diffusion_pytorch_model",),
        "diffusion_flax_model.msgpack",
        lambda c: (jnp.zeros((1, c.downsample_factor, c.downsample_factor, c.in_channels)),),
        other_classes=("IdentityAutoencoder",),
    ),
    "text_encoder": ComponentSpec(
        "clip",
        CLIPTextConfig,
        CLIPTextModel,
        ("model", "pytorch_model"),
        "flax_model.msgpack",
        lambda c: (jnp.zeros((1, 1), jnp.int32),),
    ),
    "controlnet": ComponentSpec(
        "unet",
        ControlNetConfig,
        ControlNetModel,
        ("diffusion_pytorch_model",),
        "diffusion_flax_model.msgpack",
        _controlnet_inputs,
    ),
}


def _spec(kind: str) -> ComponentSpec:
    if kind not in SPECS:
        raise ValueError(f"unknown component {kind!r}; expected one of {sorted(SPECS)}.")
    return SPECS[kind]


def read_config(folder: str, kind: str) -> Any:
    """Parse and validate ``folder/config.json`` into the component's config dataclass."""
    path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such folder (expected the {kind} component folder).")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing; a diffusers {kind} folder needs config.json.")
    raw = read_json(path, REDOWNLOAD)
    spec = _spec(kind)
    class_name = raw.get("_class_name")
    config_cls = MODEL_CLASSES[class_name][1] if class_name in spec.other_classes else spec.config_cls
    return config_cls.from_dict(raw, source=path)


def module_class(kind: str, config: Any) -> type:
    """The Flax class for a component's config (``MODEL_CLASSES``, by the config's class name)."""
    for module_cls, config_cls in MODEL_CLASSES.values():
        if type(config) is config_cls:
            return module_cls
    return _spec(kind).module_cls


def find_weights(folder: str, kind: str, variant: str | None = None) -> str:
    """Path of the weights file to read, by the preference order in the module docstring."""
    spec = _spec(kind)
    suffix = f".{variant}" if variant else ""
    candidates = []
    for stem in spec.torch_stems:
        candidates += [f"{stem}{suffix}.safetensors", f"{stem}{suffix}.safetensors.index.json"]
    candidates.append(spec.msgpack_name)
    candidates += [f"{stem}{suffix}.bin" for stem in spec.torch_stems]
    for name in candidates:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    present = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    raise FileNotFoundError(
        f"{folder}: no {kind} weights found. Looked for {candidates}; the folder holds {present}."
        + (" Is the variant right?" if variant else "")
    )


def _torch_load(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as err:
        raise ImportError(
            f"{path} is a PyTorch pickle; reading it needs torch (pip install torch), or convert "
            "the folder to safetensors."
        ) from err
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    out = {}
    for key, tensor in state.items():
        tensor = tensor.detach().cpu().contiguous()
        if tensor.dtype == torch.bfloat16:
            out[key] = tensor.view(torch.int16).numpy().view(jnp.bfloat16)
        else:
            out[key] = tensor.numpy()
    return out


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """Flat PyTorch-named state dict from a .safetensors, .safetensors.index.json or .bin file."""
    if path.endswith(".index.json"):
        weight_map = read_json(path, REDOWNLOAD).get("weight_map")
        if not weight_map or not isinstance(weight_map, dict):
            raise ValueError(f"{path}: no weight_map in the shard index. {REDOWNLOAD}")
        state: dict[str, np.ndarray] = {}
        folder = os.path.dirname(path)
        for shard in sorted(set(map(str, weight_map.values()))):
            shard_path = os.fspath(contained_path(folder, shard, path, _hub_blobs(folder)))
            if not os.path.isfile(shard_path):
                raise FileNotFoundError(f"{path} lists shard {shard}, which is missing.")
            state.update(safetensors_io.load(shard_path))
        return state
    if path.endswith(".safetensors"):
        return safetensors_io.load(path)
    if path.endswith(".bin"):
        return _torch_load(path)
    raise ValueError(f"{path}: not a PyTorch weights file (.safetensors, .index.json or .bin).")


def _hub_blobs(folder: str) -> tuple[str, ...]:
    """``…/models--org--name/blobs`` when ``folder`` lies in a Hugging Face cache snapshot, whose
    files are symbolic links into it; else nothing."""
    parts = os.path.realpath(folder).split(os.sep)
    if "snapshots" in parts[1:]:
        at = len(parts) - 1 - parts[::-1].index("snapshots")
        if parts[at - 1].startswith("models--"):
            return (os.sep.join([*parts[:at], "blobs"]),)
    return ()


def read_msgpack(path: str) -> dict:
    """Flat Flax param dict from a diffusers/transformers Flax ``*.msgpack`` file."""
    with open(path, "rb") as f:
        try:
            tree = serialization.msgpack_restore(f.read())
        except Exception as err:  # msgpack raises several exception types
            raise ValueError(f"{path}: not a readable Flax msgpack file ({err}).") from err
    if set(tree) == {"params"}:
        tree = tree["params"]
    return flatten(tree)


def load_component(
    folder: str,
    kind: str,
    dtype: Any = "float32",
    param_dtype: Any = "float32",
    variant: str | None = None,
    **module_kwargs: Any,
) -> tuple[Any, dict]:
    """Build the Flax module of a component folder and load its checked params.

    Args:
      folder: e.g. ``.../stable-diffusion-v1-5/unet``.
      kind: ``"unet"``, ``"vae"`` or ``"text_encoder"``.
      dtype: compute dtype name or dtype; param_dtype: dtype the params are cast to.
      variant: weights variant such as ``"fp16"`` (``diffusion_pytorch_model.fp16.safetensors``).
      module_kwargs: extra module fields (``remat``, ``attention_impl``).
    Returns:
      (module, params) with params a nested dict of numpy arrays in ``param_dtype``.
    """
    spec = _spec(kind)
    config = read_config(folder, kind)
    module = module_class(kind, config)(
        config, dtype=parse_dtype(dtype), param_dtype=parse_dtype(param_dtype), **module_kwargs
    )
    expected = spec.expected_shapes(module)
    if not expected:
        return module, {}
    path = find_weights(folder, kind, variant)
    flat = (
        read_msgpack(path) if path.endswith(".msgpack") else torch_to_flax(read_state_dict(path), spec.family)
    )
    check_tree(flat, expected, source=path)
    target = np.dtype(parse_dtype(param_dtype))
    params = unflatten({k: np.asarray(v).astype(target, copy=False) for k, v in flat.items()})
    return module, params


def save_component(
    folder: str, kind: str, module: Any, params: Any, fmt: str = "safetensors", dtype: Any = None
) -> str:
    """Write ``config.json`` and the weights of one component; returns the weights path.

    ``fmt="safetensors"`` writes PyTorch names (loadable by diffusers/transformers);
    ``fmt="msgpack"`` writes the Flax tree. ``dtype`` casts floating params (default: as they are).
    """
    spec = _spec(kind)
    os.makedirs(folder, exist_ok=True)
    flat = flatten(jax.device_get(params))
    check_tree(flat, spec.expected_shapes(module), source=f"params for {folder}")
    if dtype is not None:
        target = np.dtype(parse_dtype(dtype))
        flat = {k: np.asarray(v).astype(target) for k, v in flat.items()}
    config_path = os.path.join(folder, "config.json")
    write_json_atomic(config_path, module.config.to_dict(), indent=2, sort_keys=True)
    if not flat:  # a parameter-free component: its config is all there is
        return config_path
    if fmt == "msgpack":
        path = os.path.join(folder, spec.msgpack_name)
        tree = jax.tree.map(np.asarray, unflatten(flat))
        write_bytes_atomic(path, serialization.msgpack_serialize(tree))
        return path
    if fmt != "safetensors":
        raise ValueError(f"unknown weights format {fmt!r}; expected 'safetensors' or 'msgpack'.")
    path = os.path.join(folder, f"{spec.torch_stems[0]}.safetensors")
    safetensors_io.save(path, flax_to_torch(flat, spec.family), metadata={"format": "pt"})
    return path
