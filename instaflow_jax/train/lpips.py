"""LPIPS-VGG through lpips-j, with weights from a local folder or the Hugging Face cache only.

lpips-j fetches ``vgg16_weights.h5`` and ``lpips_lin.h5`` from the hub repo ``pcuenq/lpips-jax``
inside ``setup``. Here the same modules and computation are used, but the two files are looked up
in ``weights_dir`` first and then in the local Hugging Face cache; nothing is ever downloaded, and
a missing file is named in the error with the command that fetches it.
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import h5py
import jax
import jax.numpy as jnp
from lpips_j import lpips as lpips_j

HUB_REPO = "pcuenq/lpips-jax"
VGG_FILE, LIN_FILE = "vgg16_weights.h5", "lpips_lin.h5"
FEATURES = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")


def resolve_weights(weights_dir: str | None = None) -> dict[str, str]:
    """Paths of the two LPIPS weight files, without network access; raises FileNotFoundError."""
    paths, missing = {}, []
    for name in (VGG_FILE, LIN_FILE):
        local = os.path.join(os.path.expanduser(weights_dir), name) if weights_dir else None
        if local and os.path.isfile(local):
            paths[name] = local
            continue
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(HUB_REPO, name)
        except Exception:  # no huggingface_hub or an unreadable cache: treat as not cached
            cached = None
        if isinstance(cached, str) and os.path.isfile(cached):
            paths[name] = cached
        else:
            missing.append(name)
    if missing:
        where = f"{weights_dir} nor " if weights_dir else ""
        raise FileNotFoundError(
            f"LPIPS weights {missing} were found neither in {where}the Hugging Face cache. Fetch them "
            f"where there is network: `hf download {HUB_REPO} {VGG_FILE} {LIN_FILE} "
            "--local-dir DIR` and set the LPIPS weights directory to DIR (config: lpips_weights_dir)."
        )
    return paths


class _LocalVGG(lpips_j.vgg.VGG):
    """lpips-j's VGG16 feature extractor (flaxmodels VGG, activations, no head), h5 from a path."""

    output: str = "activations"
    pretrained: str = "imagenet"
    architecture: str = "vgg16"
    include_head: bool = False
    vgg_path: str = ""

    def setup(self) -> None:
        self.param_dict = h5py.File(self.vgg_path, "r")


class LPIPS(lpips_j.LPIPS):
    """lpips-j's LPIPS with local weight files. Inputs [B, H, W, 3] in [-1, 1]; output [B, 1, 1, 1]."""

    vgg_path: str = ""
    lin_path: str = ""

    def setup(self) -> None:
        self.feature_names = list(FEATURES)
        self.vgg = _LocalVGG(vgg_path=self.vgg_path)
        with h5py.File(self.lin_path, "r") as lin:
            weights = [jnp.array(lin[f"lin{i}"]) for i in range(len(FEATURES))]
        self.lins = [lpips_j.NetLinLayer(w) for w in weights]


def make_lpips(weights_dir: str | None = None, image_size: int = 64) -> tuple[LPIPS, Any]:
    """The LPIPS module and its (frozen) params, initialised from the weight files."""
    paths = resolve_weights(weights_dir)
    module = LPIPS(vgg_path=paths[VGG_FILE], lin_path=paths[LIN_FILE])
    dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    params = jax.jit(module.init)(jax.random.key(0), dummy, dummy)
    return module, params


def lpips_distance(module: nn.Module, params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    """Per-sample LPIPS distance [B] between images in [-1, 1], NHWC (float32)."""
    return module.apply(params, x.astype(jnp.float32), y.astype(jnp.float32)).reshape(x.shape[0])
