"""PyTorch state dicts ↔ Flax param trees for the UNet, the VAE and the CLIP text encoder.

PyTorch names (``down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0.weight``) map to
diffusers-Flax paths (``down_blocks_0/attentions_1/transformer_blocks_0/attn1/to_out_0/kernel``):
list indices merge into the module name, VAE attention projections take their Flax names, conv
kernels go OIHW → HWIO, linear kernels are transposed, norm weights become ``scale``.
CLIP keeps transformers' names (``text_model/encoder/layers/0/self_attn/q_proj/kernel``) and its
embeddings become ``embedding``. Every converted tree is checked against the model's
``jax.eval_shape`` before use.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flax import traverse_util

DIFFUSERS_LIST_MODULES = (
    "down_blocks",
    "up_blocks",
    "resnets",
    "attentions",
    "downsamplers",
    "upsamplers",
    "transformer_blocks",
    "net",
    "to_out",
    "blocks",  # ControlNet conditioning embedding
    "controlnet_down_blocks",
)
# diffusers-Flax keeps the PyTorch attention names in the UNet (to_q … to_out_0) but uses
# query/key/value/proj_attn in the VAE, which old PyTorch VAE checkpoints also use.
VAE_ATTENTION_TO_FLAX = {
    "to_q": "query",
    "to_k": "key",
    "to_v": "value",
    "to_out_0": "proj_attn",
    "query": "query",
    "key": "key",
    "value": "value",
    "proj_attn": "proj_attn",
}
VAE_FLAX_TO_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
ATTENTION_LEAVES = frozenset(VAE_ATTENTION_TO_FLAX)
DROPPED_KEYS = re.compile(r"(^|\.)position_ids$")
_LIST_INDEX = re.compile(r"^({})_(\d+)$".format("|".join(DIFFUSERS_LIST_MODULES)))

Path = tuple[str, ...]


class WeightsMismatchError(ValueError):
    """A converted param tree that does not match the model's expected tree."""


def _leaf_to_flax(parts: list[str], tensor: np.ndarray, embedding_parent: bool) -> tuple[Path, np.ndarray]:
    *parent, leaf = parts
    if leaf == "bias":
        return tuple(parent) + ("bias",), tensor
    if leaf != "weight":
        raise KeyError(leaf)
    if embedding_parent:
        return tuple(parent) + ("embedding",), tensor
    if tensor.ndim == 1:
        return tuple(parent) + ("scale",), tensor
    if tensor.ndim == 4 and parent and parent[-1] in ATTENTION_LEAVES:
        if tensor.shape[2:] != (1, 1):  # old VAE checkpoints store q/k/v as 1×1 convs
            raise WeightsMismatchError(f"attention weight {'.'.join(parts)} has shape {tensor.shape}.")
        tensor = tensor[:, :, 0, 0]
    if tensor.ndim == 4:
        return tuple(parent) + ("kernel",), tensor.transpose(2, 3, 1, 0)
    if tensor.ndim == 2:
        return tuple(parent) + ("kernel",), tensor.T
    raise WeightsMismatchError(f"{'.'.join(parts)}: unexpected {tensor.ndim}-d weight.")


def diffusers_key_to_flax(key: str, family: str) -> list[str]:
    """``a.resnets.0.conv1.weight`` → ``["a", "resnets_0", "conv1", "weight"]``; VAE attention
    projections take their Flax names (``to_q`` → ``query`` …)."""
    parts: list[str] = []
    for part in key.split("."):
        if part.isdigit() and parts and parts[-1] in DIFFUSERS_LIST_MODULES:
            parts[-1] = f"{parts[-1]}_{part}"
        else:
            parts.append(part)
    if family == "vae" and len(parts) >= 2 and parts[-2] in VAE_ATTENTION_TO_FLAX:
        parts[-2] = VAE_ATTENTION_TO_FLAX[parts[-2]]
    return parts


def torch_to_flax(state_dict: Mapping[str, np.ndarray], family: str) -> dict[Path, np.ndarray]:
    """Flat PyTorch state dict (numpy arrays) → flat Flax dict {path tuple: array}.

    ``family`` is ``"unet"``, ``"vae"`` or ``"clip"``. CLIP's ``position_ids`` buffer is dropped;
    CLIP keys saved without the ``text_model.`` prefix (transformers ≥ 5) get it.
    """
    if family not in ("unet", "vae", "clip"):
        raise ValueError(f"unknown model family {family!r}; expected unet, vae or clip.")
    flat: dict[Path, np.ndarray] = {}
    if family == "clip":  # transformers ≥ 5 saves CLIPTextModel without the text_model. prefix
        state_dict = {
            k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state_dict.items()
        }
    for key, tensor in state_dict.items():
        if DROPPED_KEYS.search(key):
            continue
        parts = key.split(".") if family == "clip" else diffusers_key_to_flax(key, family)
        embedding = family == "clip" and parts[-2].endswith("_embedding")
        try:
            path, value = _leaf_to_flax(parts, np.asarray(tensor), embedding)
        except KeyError:
            path, value = tuple(parts), np.asarray(tensor)  # reported as unexpected by the check
        if path in flat:
            raise WeightsMismatchError(f"two checkpoint tensors map to {'/'.join(path)} (e.g. {key}).")
        flat[path] = value
    return flat


def flax_to_torch(flat: Mapping[Path, Any], family: str) -> dict[str, np.ndarray]:
    """Flat Flax dict → PyTorch state dict with current diffusers/transformers names and layouts."""
    out: dict[str, np.ndarray] = {}
    for path, value in flat.items():
        value = np.asarray(value)
        if path[-1] == "kernel":
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        out[flax_path_to_torch_key(path, family)] = np.ascontiguousarray(value)
    return out


def flax_path_to_torch_key(path: Path, family: str) -> str:
    """``("down_blocks_0", "resnets_1", "conv1", "kernel")`` → ``"down_blocks.0.resnets.1.conv1.weight"``."""
    *parent, leaf = path
    if family != "clip":
        names: list[str] = []
        for part in parent:
            match = _LIST_INDEX.match(part)
            names.extend([match.group(1), match.group(2)] if match else [part])
        if family == "vae" and names and names[-1] in VAE_FLAX_TO_ATTENTION:
            names[-1:] = VAE_FLAX_TO_ATTENTION[names[-1]].split(".")
        parent = names
    if leaf in ("kernel", "scale", "embedding"):
        leaf = "weight"
    return ".".join(list(parent) + [leaf])


def _shape_lines(paths: Iterable[Path], limit: int = 12) -> str:
    paths = sorted(paths)
    text = ", ".join("/".join(p) for p in paths[:limit])
    return text + (f", … ({len(paths) - limit} more)" if len(paths) > limit else "")


_SD_HINT = (
    "Check that config.json belongs to these weights and that the folder is an SD 1.x "
    "(diffusers layout) component."
)


def check_tree(
    flat: Mapping[Path, Any], expected: Mapping[Path, Any], source: str, hint: str | None = None
) -> None:
    """Raise ``WeightsMismatchError`` naming missing, unexpected and mis-shaped params.

    ``expected`` is the flattened ``jax.eval_shape`` of the model's init (leaves have ``.shape``);
    ``hint`` ends the message (default: advice for SD 1.x diffusers components).
    """
    missing = set(expected) - set(flat)
    unexpected = set(flat) - set(expected)
    misshaped = [
        f"{'/'.join(p)}: checkpoint {tuple(np.shape(flat[p]))} vs model {tuple(expected[p].shape)}"
        for p in sorted(set(flat) & set(expected))
        if tuple(np.shape(flat[p])) != tuple(expected[p].shape)
    ]
    if not (missing or unexpected or misshaped):
        return
    lines = [f"{source}: the weights do not match the model built from its config.json."]
    if missing:
        lines.append(f"missing ({len(missing)}): {_shape_lines(missing)}")
    if unexpected:
        lines.append(f"unexpected ({len(unexpected)}): {_shape_lines(unexpected)}")
    if misshaped:
        more = f" … ({len(misshaped) - 12} more)" if len(misshaped) > 12 else ""
        lines.append(f"mis-shaped ({len(misshaped)}): " + "; ".join(misshaped[:12]) + more)
    lines.append(hint or _SD_HINT)
    raise WeightsMismatchError("\n  ".join(lines))


def flatten(tree: Mapping) -> dict[Path, Any]:
    return traverse_util.flatten_dict(tree)


def unflatten(flat: Mapping[Path, Any]) -> dict:
    return traverse_util.unflatten_dict(dict(flat))
