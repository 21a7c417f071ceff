"""LoRA files for the SD 1.x UNet and text encoder: read the formats people have, merge functionally.

Formats (``.safetensors``; detected per key, so mixed files work):

* kohya / A1111 / LyCORIS LoCon: ``lora_unet_<module>.lora_down.weight``, ``.lora_up.weight``,
  optional ``.lora_mid.weight`` (Tucker-decomposed conv) and ``.alpha``; ``lora_te_<module>…`` for
  the text encoder. ``<module>`` is the diffusers/transformers module path with ``_`` for ``.``.
* diffusers (pre-PEFT): ``unet.<module>.lora.down.weight`` / ``.lora.up.weight``, attention
  processors ``….processor.to_q_lora.down.weight``, ``text_encoder.<module>.lora_linear_layer.down
  .weight`` and ``<prefix>.<module>.alpha``.
* PEFT (what diffusers' ``save_lora_weights`` writes today): ``unet.<module>.lora_A.weight`` /
  ``.lora_B.weight``, optionally ``base_model.model.``-prefixed; alphas from the
  ``lora_adapter_metadata`` header (or an ``adapter_config.json`` beside the file), else alpha = rank.

Each layer adds ``scale · (alpha / rank) · up @ down`` to its weight (docs/method.md §6), for linear
layers and convolutions (LoCon), computed in float32 and cast back to the weight's dtype.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from instaflow_jax.weights import safetensors_io
from instaflow_jax.weights.convert import flatten, flax_path_to_torch_key, unflatten

FAMILIES = {"unet": "unet", "text_encoder": "clip"}
_KOHYA = re.compile(r"^lora_(unet|te)_(\w+?)\.(lora_down|lora_up|lora_mid|alpha)(?:\.weight)?$")
_PEFT = re.compile(
    r"^(?:(unet|text_encoder)\.)?(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight$"
)
_DIFFUSERS = re.compile(r"^(unet|text_encoder)\.(.+?)(?:\.lora|\.lora_linear_layer)?\.(down|up)\.weight$")
_DIFFUSERS_ALPHA = re.compile(r"^(unet|text_encoder)\.(.+)\.alpha$")
_ROLES = {"lora_down": "down", "lora_up": "up", "lora_mid": "mid", "A": "down", "B": "up", "alpha": "alpha"}
# Keys of other model families: SDXL (kohya's sgm naming, a second text encoder), DiT models.
_OTHER_ARCHITECTURES = (
    (re.compile(r"^lora_te[12]_|(^|\.)text_encoder_2\.|^te2\."), "SDXL (a second text encoder)"),
    (
        re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks|label_emb)"),
        "SDXL (kohya's sgm UNet names)",
    ),
    (re.compile(r"add_embedding|(^|\.)label_emb"), "SDXL (added conditioning embeddings)"),
    (
        re.compile(r"^(transformer|lora_transformer|diffusion_model)[._]|double_blocks|single_blocks"),
        "a DiT model (Flux/SD3)",
    ),
)
_UNSUPPORTED = re.compile(r"hada_|lokr_|dora_scale|lora_magnitude_vector|\.diff(_b)?$|lora_embedding_")


class LoRAError(ValueError):
    """A LoRA file that cannot be merged into this pipeline as asked."""


@dataclasses.dataclass
class LoRALayer:
    """One low-rank update: ``down`` [r, in(, kh, kw)], ``up`` [out, r(, 1, 1)], optional ``mid``."""

    component: str  # "unet" or "text_encoder"
    module: str  # module path as found (kohya: with underscores)
    kohya: bool = False
    down: np.ndarray | None = None
    up: np.ndarray | None = None
    mid: np.ndarray | None = None
    alpha: float | None = None
    keys: list[str] = dataclasses.field(default_factory=list)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


def _normalise_module(component: str, module: str) -> str:
    """diffusers/PEFT module path → our PyTorch module path (``…attn1.to_out.0``, ``text_model.…``)."""
    module = module.replace(".processor.", ".")
    attention = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
    match = re.search(r"(?:^|\.)(to_q|to_k|to_v|to_out)_lora$", module)
    if match:  # old attention-processor LoRA names
        name = match.group(1)
        base = module[: match.start(1)]
        if component == "text_encoder":
            return _normalise_module(component, base + attention[name])
        module = base + (name + ".0" if name == "to_out" else name)
    if component == "text_encoder" and not module.startswith("text_model."):
        module = "text_model." + module  # transformers ≥ 5 names CLIPTextModel without it
    return module


def read_lora(path: str) -> tuple[list[LoRALayer], list[str]]:
    """Parse a LoRA ``.safetensors`` file (or a folder holding one).

    Returns:
      (layers, unsupported keys). Layers hold float32 numpy tensors in PyTorch layout.
    Raises:
      LoRAError: not a LoRA file, or one made for another architecture (SDXL, Flux, SD3).
    """
    path = _lora_file(path)
    tensors = safetensors_io.load(path)
    _, header = safetensors_io.read_header(path)
    name = os.path.basename(path)
    for key in tensors:
        for pattern, family in _OTHER_ARCHITECTURES:
            if pattern.search(key):
                raise LoRAError(
                    f"{name} is a LoRA for another architecture, {family} (key {key!r}); this pipeline is "
                    "SD 1.x-family: use a LoRA trained on SD 1.5."
                )
    config = _peft_config(path, header)
    layers: dict[tuple[str, str], LoRALayer] = {}
    unsupported = []
    for key, tensor in tensors.items():
        parsed = _parse_key(key)
        if parsed is None:
            unsupported.append(key)
            continue
        component, module, role, kohya = parsed
        if not kohya:
            module = _normalise_module(component, module)
        layer = layers.setdefault((component, module), LoRALayer(component, module, kohya))
        layer.keys.append(key)
        if role == "alpha":
            layer.alpha = float(np.asarray(tensor, np.float64).reshape(-1)[0])
        else:
            setattr(layer, role, np.asarray(tensor).astype(np.float32))
    for layer in layers.values():
        if layer.alpha is None and layer.down is not None and not layer.kohya:
            layer.alpha = _peft_alpha(config, layer)
    if not layers and not unsupported:
        raise LoRAError(f"{name} holds no tensors.")
    return list(layers.values()), unsupported


def _lora_file(path: str) -> str:
    path = os.path.expanduser(os.fspath(path))
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if len(files) != 1:
            raise LoRAError(f"{path}: expected one LoRA .safetensors file in the folder, found {files}.")
        path = os.path.join(path, files[0])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such LoRA file (expected a .safetensors file).")
    if not path.endswith(".safetensors"):
        raise LoRAError(f"{path}: LoRA files are read from .safetensors only; convert .pt/.ckpt files first.")
    return path


def _parse_key(key: str) -> tuple[str, str, str, bool] | None:
    """key → (component, module, role, is_kohya) or None (not a plain LoRA tensor)."""
    if _UNSUPPORTED.search(key):
        return None
    match = _KOHYA.match(key)
    if match:
        component = "unet" if match.group(1) == "unet" else "text_encoder"
        return component, match.group(2), _ROLES[match.group(3)], True
    match = _PEFT.match(key)
    if match:
        module = match.group(2)
        component = match.group(1) or (
            "text_encoder" if re.match(r"(text_model\.)?encoder\.layers\.", module) else "unet"
        )
        return component, module, _ROLES[match.group(3)], False
    match = _DIFFUSERS.match(key)
    if match:
        return match.group(1), match.group(2), match.group(3), False
    match = _DIFFUSERS_ALPHA.match(key)
    if match:
        return match.group(1), match.group(2), "alpha", False
    return None


def _peft_config(path: str, header: Mapping[str, str]) -> dict[str, Any]:
    """PEFT LoraConfig fields per component: {"unet": {...}, "text_encoder": {...}, "": {...}}."""
    config: dict[str, dict[str, Any]] = {}
    raw = header.get("lora_adapter_metadata")
    if raw:
        for key, value in json.loads(raw).items():
            component, _, field = key.partition(".")
            if component in FAMILIES:
                config.setdefault(component, {})[field] = value
            else:
                config.setdefault("", {})[key] = value
    beside = os.path.join(os.path.dirname(path), "adapter_config.json")
    if os.path.isfile(beside):
        with open(beside, encoding="utf-8") as f:
            config.setdefault("", json.load(f))
    return config


def _peft_alpha(config: Mapping[str, Any], layer: LoRALayer) -> float | None:
    """alpha of a PEFT layer as PEFT computes its scaling (alpha_pattern, use_rslora); None = rank."""
    fields = config.get(layer.component) or config.get("")
    if not fields or fields.get("lora_alpha") is None:
        return None
    module = layer.module.removeprefix("text_model.")
    alpha = float(fields["lora_alpha"])
    for pattern, value in (fields.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module) or re.match(rf"(.*\.)?({pattern})$", layer.module):
            alpha = float(value)
            break
    if fields.get("use_rslora"):  # scaling alpha / sqrt(r), written as an alpha over r
        alpha = alpha * math.sqrt(layer.rank)
    return alpha


def _targets(params: Mapping[str, Any], component: str) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """PyTorch module path → (Flax kernel path, PyTorch weight shape) for every dense/conv layer."""
    out = {}
    for path, leaf in flatten(params[component]).items():
        if path[-1] != "kernel":
            continue
        shape = tuple(np.shape(leaf))
        torch_shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else (shape[1], shape[0])
        out[flax_path_to_torch_key(path, FAMILIES[component]).removesuffix(".weight")] = (path, torch_shape)
    return out


def layer_delta(layer: LoRALayer, torch_shape: tuple[int, ...]) -> np.ndarray:
    """``(alpha / r) · up @ down`` (or ``up · mid · down`` for Tucker LoCon), float32, PyTorch layout.

    Raises LoRAError when the layer's shape does not fit a weight of ``torch_shape``.
    """
    down, up, rank = layer.down, layer.up, layer.rank
    out_dim, in_dim = up.shape[0], down.shape[1]
    kernel = tuple(down.shape[2:] if layer.mid is None else layer.mid.shape[2:]) or (1, 1)
    wanted_kernel = tuple(torch_shape[2:]) or (1, 1)
    if (out_dim, in_dim) != torch_shape[:2] or kernel != wanted_kernel:
        raise LoRAError(
            f"{layer.keys[0]}: the LoRA maps {in_dim} → {out_dim} features (kernel {kernel}) but "
            f"this model's layer maps {torch_shape[1]} → {torch_shape[0]} (kernel {wanted_kernel}): "
            "the LoRA was made for another architecture (SDXL's text width is 2048, SD 2.x's 1024)."
        )
    up2 = up.reshape(out_dim, rank)
    if layer.mid is None:
        delta = up2 @ down.reshape(rank, -1)
    else:
        delta = np.einsum("oa,abhw,bi->oihw", up2, layer.mid, down.reshape(rank, in_dim))
    alpha = rank if layer.alpha is None else layer.alpha
    return (delta * (alpha / rank)).reshape(torch_shape).astype(np.float32)


def lora_deltas(
    params: Mapping[str, Any], path: str, strict: bool = True
) -> tuple[dict[str, dict[tuple[str, ...], np.ndarray]], list[str]]:
    """Weight updates of a LoRA file for ``params`` (a pipeline's ``{"unet": …, "text_encoder": …}``).

    Returns:
      ({component: {Flax kernel path: float32 delta in the kernel's layout}}, skipped keys).
    Raises:
      LoRAError: keys that match no layer (unless ``strict=False``: they are skipped, listed in
        a warning and returned), or shapes of another architecture.
    """
    layers, unsupported = read_lora(path)
    name = os.path.basename(os.fspath(path))
    skipped: list[str] = []
    targets = {c: _targets(params, c) for c in FAMILIES if c in params}
    kohya = {c: {module.replace(".", "_"): module for module in t} for c, t in targets.items()}
    deltas: dict[str, dict[tuple[str, ...], np.ndarray]] = {}
    for layer in layers:
        module = kohya.get(layer.component, {}).get(layer.module) if layer.kohya else layer.module
        target = targets.get(layer.component, {}).get(module) if module else None
        if target is None or layer.down is None or layer.up is None:
            skipped.extend(layer.keys)
            continue
        flax_path, torch_shape = target
        delta = layer_delta(layer, torch_shape)
        delta = delta.transpose(2, 3, 1, 0) if delta.ndim == 4 else delta.T
        mine = deltas.setdefault(layer.component, {})
        mine[flax_path] = mine[flax_path] + delta if flax_path in mine else delta
    problems = []
    for keys, what in (
        (skipped, "match no layer of this UNet/text encoder"),
        (
            unsupported,
            "are not plain LoRA tensors (LoHa, LoKr, DoRA and full-weight diffs are not supported)",
        ),
    ):
        if keys:
            listed = ", ".join(sorted(keys)[:8]) + (f", … ({len(keys) - 8} more)" if len(keys) > 8 else "")
            problems.append(f"{len(keys)} keys {what}: {listed}")
    if problems and strict:
        raise LoRAError(
            f"{name}: "
            + "; ".join(problems)
            + ". Pass strict=False (CLI: --lora-skip-unmatched) to skip them."
        )
    if problems:
        warnings.warn(f"{name}: skipped " + "; ".join(problems) + ".", stacklevel=3)
    if not deltas:
        raise LoRAError(f"{name}: no LoRA layer matched this pipeline's UNet or text encoder.")
    return deltas, sorted(skipped + unsupported)


def merge_lora(
    params: Mapping[str, Any], path: str, scale: float = 1.0, strict: bool = True
) -> tuple[dict[str, Any], list[str]]:
    """A new params dict with ``W + scale · ΔW`` for every LoRA layer; ``params`` is not modified.

    Untouched leaves are shared with ``params``; merged ones are host (numpy) arrays, placed on
    devices by the caller (``Pipeline`` does). Returns (new params, skipped keys).
    """
    deltas, skipped = lora_deltas(params, path, strict)
    merged = dict(params)
    for component, updates in deltas.items():
        flat = flatten(params[component])
        for path_, delta in updates.items():
            weight = flat[path_]
            updated = np.asarray(weight, np.float32) + np.float32(scale) * delta
            flat[path_] = updated.astype(weight.dtype)
        merged[component] = unflatten(flat)
    return merged, skipped
