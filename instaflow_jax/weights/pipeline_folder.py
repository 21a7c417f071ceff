"""Read and write whole diffusers pipeline folders of the SD 1.x family.

Layout: ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/`` and optionally
``scheduler/``. Anything that is not SD 1.x-shaped (SDXL's second text encoder, SD 2's wider
cross-attention, a 9-channel inpainting UNet) is refused with one error saying what was found.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

from instaflow_jax.files import read_json, write_json_atomic
from instaflow_jax.models.configs import ConfigError
from instaflow_jax.text import load_tokenizer
from instaflow_jax.weights.folder import REDOWNLOAD, load_component, read_config, save_component

COMPONENTS = ("unet", "vae", "text_encoder")
REQUIRED = COMPONENTS + ("tokenizer",)
DEFAULT_SCHEDULER_CONFIG = {  # SD 1.x training noise schedule (scaled-linear betas)
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "trained_betas": None,
}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve_folder(path: str) -> str:
    """A local folder, or a Hugging Face repo id already in the local cache (never downloads)."""
    path = os.path.expanduser(os.fspath(path))
    if os.path.isdir(path):
        return path
    if _HUB_ID.match(path) and not os.path.exists(path):
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(path, local_files_only=True)
        except Exception as err:  # not cached, or huggingface_hub missing
            raise FileNotFoundError(
                f"{path!r} is neither a local folder nor a cached Hugging Face repo ({type(err).__name__}). "
                f"Download it first, e.g. `hf download {path} --local-dir DIR "
                "--exclude '*.bin' --exclude '*.ckpt'`, then pass DIR."
            ) from err
    raise FileNotFoundError(
        f"{path}: no such folder. Expected a diffusers SD 1.x pipeline folder containing "
        f"model_index.json and {list(REQUIRED)}."
    )


def read_model_index(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(path):
        hint = (
            " This looks like a single component folder (it has config.json): load it with "
            "instaflow_jax.weights.load_component, or pass its parent pipeline folder."
            if os.path.isfile(os.path.join(folder, "config.json"))
            else ""
        )
        raise FileNotFoundError(
            f"{folder}: model_index.json is missing; not a diffusers pipeline folder.{hint}"
        )
    index = read_json(path, REDOWNLOAD)
    if "text_encoder_2" in index or "tokenizer_2" in index:
        raise ConfigError(
            f"{path}: found a second text encoder (text_encoder_2), as in SDXL; expected an SD 1.x "
            "pipeline with a single CLIP text encoder."
        )
    missing = [name for name in REQUIRED if not os.path.isdir(os.path.join(folder, name))]
    if missing:
        raise FileNotFoundError(
            f"{folder}: sub-folders {missing} are missing; an SD 1.x pipeline folder needs {list(REQUIRED)}."
        )
    return index


def check_family(unet_config: Any, vae_config: Any, text_config: Any, folder: str) -> None:
    """The three components must fit together the way SD 1.x's do."""
    if unet_config.cross_attention_dim != text_config.hidden_size:
        raise ConfigError(
            f"{folder}: the UNet attends to {unet_config.cross_attention_dim}-wide text features "
            f"but the text encoder produces {text_config.hidden_size} (SD 1.x: 768 and 768; "
            "SD 2.x uses 1024). Expected an SD 1.x-family pipeline."
        )
    if (
        unet_config.in_channels != vae_config.latent_channels
        or unet_config.out_channels != vae_config.latent_channels
    ):
        raise ConfigError(
            f"{folder}: the UNet maps {unet_config.in_channels} → {unet_config.out_channels} channels "
            f"but the VAE latent has {vae_config.latent_channels} (an inpainting or other "
            "special-purpose UNet?). Expected a text-to-image SD 1.x pipeline."
        )


@dataclasses.dataclass(frozen=True)
class PipelineParts:
    """What :func:`load_pipeline_parts` reads from a pipeline folder.

    Attributes:
      modules: ``unet``, ``vae``, ``text_encoder`` → Flax modules.
      params: the same names → param trees (numpy arrays); the dict itself may be changed.
      tokenizer: the CLIP tokenizer of ``tokenizer/``.
      scheduler_config: ``scheduler/scheduler_config.json`` (SD 1.x's default when absent).
      source: the resolved local folder.
    """

    modules: dict[str, Any]
    params: dict[str, Any]
    tokenizer: Any
    scheduler_config: dict[str, Any]
    source: str


def load_pipeline_parts(
    path: str,
    dtype: Any = "float32",
    param_dtype: Any = "float32",
    variant: str | None = None,
    **module_kwargs: Any,
) -> PipelineParts:
    """Everything ``Pipeline`` needs from a folder: modules, params, tokenizer, scheduler config."""
    folder = resolve_folder(path)
    read_model_index(folder)  # validates the folder; its contents are not needed here
    configs = {name: read_config(os.path.join(folder, name), name) for name in COMPONENTS}
    check_family(configs["unet"], configs["vae"], configs["text_encoder"], folder)
    scheduler_path = os.path.join(folder, "scheduler", "scheduler_config.json")
    scheduler_config = DEFAULT_SCHEDULER_CONFIG
    if os.path.isfile(scheduler_path):
        scheduler_config = read_json(scheduler_path, REDOWNLOAD)
    tokenizer_folder = os.path.join(folder, "tokenizer")
    for name in sorted(os.listdir(tokenizer_folder)):
        if name.endswith(".json"):  # transformers' own errors would not name the file
            read_json(os.path.join(tokenizer_folder, name), REDOWNLOAD)
    modules, params = {}, {}
    for name in COMPONENTS:
        kwargs = (
            module_kwargs
            if name == "unet"
            else {k: v for k, v in module_kwargs.items() if k == "attention_impl"}
        )
        modules[name], params[name] = load_component(
            os.path.join(folder, name), name, dtype, param_dtype, variant, **kwargs
        )
    return PipelineParts(
        modules=modules,
        params=params,
        tokenizer=load_tokenizer(tokenizer_folder),
        scheduler_config=scheduler_config,
        source=folder,
    )


def save_pipeline_parts(
    folder: str,
    modules: dict[str, Any],
    params: dict[str, Any],
    tokenizer: Any,
    scheduler_config: dict | None = None,
    fmt: str = "safetensors",
    dtype: Any = None,
) -> None:
    """Write a diffusers folder that ``load_pipeline`` and PyTorch ``diffusers`` both load."""
    os.makedirs(folder, exist_ok=True)
    for name in COMPONENTS:
        save_component(os.path.join(folder, name), name, modules[name], params[name], fmt, dtype)
    tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    scheduler_config = dict(scheduler_config or DEFAULT_SCHEDULER_CONFIG)
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    write_json_atomic(
        os.path.join(folder, "scheduler", "scheduler_config.json"), scheduler_config, indent=2, sort_keys=True
    )
    vae_class = modules["vae"].config.CLASS_NAMES[0]
    vae_entry = ["diffusers" if vae_class == "AutoencoderKL" else "instaflow_jax", vae_class]
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.30.0",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": vae_entry,
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", scheduler_config.get("_class_name", "PNDMScheduler")],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    write_json_atomic(os.path.join(folder, "model_index.json"), index, indent=2)  # last: marks it complete
