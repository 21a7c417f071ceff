"""Fine-tuned-base transfer: move an SD 1.5 fine-tune's weight delta onto InstaFlow (or the 2-RF).

``target + scale · (finetuned − base)`` for the UNet, and for the text encoder when the fine-tune
changed it (docs/method.md §6): a DreamBooth or style fine-tune of SD 1.5 then generates in one step.
The fine-tune's VAE is taken when it differs from the base's (same latent space, its own decoder);
a component that differs only by half-precision rounding (a fine-tune saved in float16) counts as
unchanged. The tokenizer and scheduler config are the target's. All three folders must be SD
1.x-family diffusers pipelines of one architecture; the arithmetic is float32 and the output is a
diffusers folder (float32 safetensors) that ``load_pipeline`` and PyTorch diffusers load.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from instaflow_jax.models.configs import ConfigError
from instaflow_jax.text import load_tokenizer
from instaflow_jax.weights.convert import flatten, unflatten
from instaflow_jax.weights.folder import load_component, read_config
from instaflow_jax.weights.pipeline_folder import (
    COMPONENTS,
    DEFAULT_SCHEDULER_CONFIG,
    check_family,
    read_model_index,
    resolve_folder,
    save_pipeline_parts,
)

# Config fields that do not change the weights' shapes or the computation.
_IRRELEVANT = {"sample_size", "_class_name", "bos_token_id", "eos_token_id", "pad_token_id", "projection_dim"}
# A component counts as unchanged when it differs from the base's only by half-precision rounding
# (a fine-tune saved in float16/bfloat16): |finetuned − base| ≤ 2⁻⁸·|base| + 2⁻²⁴ everywhere.
_ROUNDING = 2.0**-8


@dataclasses.dataclass
class TransferReport:
    """What :func:`transfer` did: per component "transferred", "target" or "finetuned", and
    the largest |finetuned − base| per component."""

    actions: dict[str, str]
    max_abs_delta: dict[str, float]
    out: str


def _open(path: str, role: str) -> tuple[str, dict[str, Any]]:
    if os.path.isfile(os.path.expanduser(os.fspath(path))):
        raise ValueError(
            f"--{role} {path} is a file; expected a diffusers pipeline folder (model_index.json, unet/, "
            "vae/, text_encoder/, tokenizer/). Convert single-file checkpoints with diffusers' "
            "StableDiffusionPipeline.from_single_file(...).save_pretrained(DIR) first."
        )
    try:
        folder = resolve_folder(path)
        read_model_index(folder)
        configs = {name: read_config(os.path.join(folder, name), name) for name in COMPONENTS}
        check_family(configs["unet"], configs["vae"], configs["text_encoder"], folder)
    except (FileNotFoundError, ConfigError) as err:
        raise type(err)(f"--{role}: {err}") from err
    return folder, configs


def _architecture(config: Any) -> dict[str, Any]:
    return {k: v for k, v in config.to_dict().items() if k not in _IRRELEVANT}


def _check_same_architecture(configs: dict[str, dict[str, Any]], name: str) -> None:
    roles = list(configs)
    reference = _architecture(configs[roles[0]][name])
    for role in roles[1:]:
        other = _architecture(configs[role][name])
        if type(configs[role][name]) is not type(configs[roles[0]][name]):
            raise ConfigError(
                f"the {name} of --{role} is a {type(configs[role][name]).__name__}, not a "
                f"{type(configs[roles[0]][name]).__name__} like --{roles[0]}'s."
            )
        diff = sorted(k for k in set(reference) | set(other) if reference.get(k) != other.get(k))
        if diff:
            found = "; ".join(f"{k}: {reference.get(k)!r} vs {other.get(k)!r}" for k in diff[:6])
            raise ConfigError(
                f"the {name} of --{role} differs in architecture from --{roles[0]}'s ({found}); "
                "transfer needs the same SD 1.x architecture in all three folders."
            )


def _load_flat(folder: str, name: str) -> tuple[Any, dict]:
    module, params = load_component(os.path.join(folder, name), name, "float32", "float32")
    return module, flatten(params)


def _delta(base: dict, finetuned: dict, name: str) -> tuple[dict, bool]:
    """(finetuned − base in place of ``finetuned`` (float32), whether it is more than rounding)."""
    changed = False
    for key, value in base.items():
        if finetuned[key].shape != value.shape:  # pragma: no cover - same config, same shapes
            raise ValueError(f"{name}: {'/'.join(key)} has shape {finetuned[key].shape} vs {value.shape}.")
        finetuned[key] = np.subtract(finetuned[key], value, dtype=np.float32)
        rounding = _ROUNDING * np.abs(value) + 2.0**-24  # float16 subnormals round to 2⁻²⁴
        changed = changed or bool(np.any(np.abs(finetuned[key]) > rounding))
    return finetuned, changed


def transfer(base: str, finetuned: str, target: str, out: str, scale: float = 1.0) -> TransferReport:
    """Write ``target + scale · (finetuned − base)`` as a diffusers folder ``out``.

    Args:
      base: the SD 1.5 folder the fine-tune started from.
      finetuned: the fine-tuned SD 1.5 folder (DreamBooth, a style model, …).
      target: the rectified-flow model to move the delta onto (InstaFlow-0.9B, 2-RF).
      out: the output folder (created).
      scale: multiplies the delta (1.0 = the whole fine-tune).
    Returns:
      a TransferReport. Raises ConfigError/ValueError/FileNotFoundError with what differs.
    """
    if not np.isfinite(scale):
        raise ValueError(f"--scale must be a finite number, got {scale}.")
    folders, configs = {}, {}
    for role, path in (("base", base), ("finetuned", finetuned), ("target", target)):
        folders[role], configs[role] = _open(path, role)
    for name in ("unet", "text_encoder"):
        _check_same_architecture(configs, name)
    _check_same_architecture({r: configs[r] for r in ("base", "finetuned")}, "vae")

    modules, params, actions, largest = {}, {}, {}, {}
    for name in ("unet", "text_encoder"):
        _, flat_base = _load_flat(folders["base"], name)
        _, flat_ft = _load_flat(folders["finetuned"], name)
        delta, changed = _delta(flat_base, flat_ft, name)
        del flat_base
        largest[name] = max((float(np.abs(v).max()) for v in delta.values() if v.size), default=0.0)
        modules[name], flat_target = _load_flat(folders["target"], name)
        if not changed and name == "text_encoder":
            actions[name] = "target"  # the fine-tune kept the text encoder: nothing to move
        else:
            for key, value in delta.items():
                flat_target[key] = (flat_target[key] + np.float32(scale) * value).astype(np.float32)
            actions[name] = "transferred"
        params[name] = unflatten(flat_target)
        del delta

    vae_base = _load_flat(folders["base"], "vae")[1]
    vae_module, vae_ft = _load_flat(folders["finetuned"], "vae")
    vae_delta, changed = _delta(vae_base, dict(vae_ft), "vae")
    largest["vae"] = max((float(np.abs(v).max()) for v in vae_delta.values() if v.size), default=0.0)
    if not changed:
        modules["vae"], params["vae"] = load_component(os.path.join(folders["target"], "vae"), "vae")
        actions["vae"] = "target"
    else:
        modules["vae"], params["vae"] = vae_module, unflatten(vae_ft)
        actions["vae"] = "finetuned"

    scheduler_path = os.path.join(folders["target"], "scheduler", "scheduler_config.json")
    scheduler = DEFAULT_SCHEDULER_CONFIG
    if os.path.isfile(scheduler_path):
        with open(scheduler_path, encoding="utf-8") as f:
            scheduler = json.load(f)
    tokenizer = load_tokenizer(os.path.join(folders["target"], "tokenizer"))
    save_pipeline_parts(out, modules, params, tokenizer, scheduler)
    return TransferReport(actions, largest, out)
