"""The two scoring networks of an evaluation: FID's Inception-v3 and a CLIP model, on device.

``FeatureNetworks.features(params, images, clip_ids)`` is pure (it runs inside the evaluation's
jitted program): generated images [B, H, W, 3] float32 in [0, 1] → ``{"pool": [B, 2048],
"clip_cos": [B]}`` (each present when its network was given).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from instaflow_jax.evaluation.clip_score import clip_cosine, clip_preprocess
from instaflow_jax.files import fingerprint
from instaflow_jax.models.clip_vision import get_image_features, get_text_features
from instaflow_jax.models.inception import inception_features
from instaflow_jax.parallel import replicated
from instaflow_jax.text import tokenize


def resize_square(images: jax.Array, size: int) -> jax.Array:
    """[B, H, W, 3] in [0, 1] → [B, size, size, 3]: bicubic, antialiased, clipped to [0, 1] (the
    generated side of the protocol's ``fid_size``; the reference side uses PIL's bicubic)."""
    if images.shape[1:3] == (size, size):
        return images
    resized = jax.image.resize(images, (images.shape[0], size, size, images.shape[3]), "bicubic")
    return jnp.clip(resized, 0.0, 1.0)


@dataclasses.dataclass
class FeatureNetworks:
    """Inception (FID) and CLIP (CLIP score) with their params (replicated over ``mesh``).

    ``params`` holds ``"inception"`` and/or ``"clip"``; ``inception_id``/``clip_id`` name the weights
    (name and content fingerprint) in manifests, so features of other weights are never mixed in.
    """

    params: dict[str, Any]
    fid_size: int | None = None
    inception_id: str | None = None
    clip_id: str | None = None
    clip_model: Any = None
    clip_tokenizer: Any = None
    clip_preprocessing: Any = None

    @property
    def has_inception(self) -> bool:
        return "inception" in self.params

    def tokenize(self, prompts: list[str]) -> np.ndarray:
        """Captions → CLIP token ids [B, 77] int32 ([B, 1] zeros without a CLIP model)."""
        if self.clip_tokenizer is None:
            return np.zeros((len(prompts), 1), np.int32)
        length = self.clip_model.config.text.max_position_embeddings
        return tokenize(self.clip_tokenizer, prompts, length)

    def pool_features(self, params: dict[str, Any], images: jax.Array) -> jax.Array:
        """Images [B, H, W, 3] in [0, 1] → Inception pool features [B, 2048] float32."""
        if self.fid_size is not None:
            images = resize_square(images, self.fid_size)
        return inception_features(params["inception"], images)

    def features(
        self, params: dict[str, Any], images: jax.Array, clip_ids: jax.Array
    ) -> dict[str, jax.Array]:
        out = {}
        if self.has_inception:
            out["pool"] = self.pool_features(params, images)
        if self.clip_model is not None:
            pre = self.clip_preprocessing
            pixels = clip_preprocess(images, pre.size, pre.image_mean, pre.image_std, pre.crop_size)
            image_embeds = get_image_features(self.clip_model, params["clip"], pixels)
            text_embeds = get_text_features(self.clip_model, params["clip"], clip_ids)
            out["clip_cos"] = clip_cosine(image_embeds, text_embeds)
        return out


def _weights_id(path: str) -> str:
    """The weights' name in manifests and cache keys: file (or folder) name and content fingerprint."""
    return f"{os.path.basename(os.path.normpath(path))}-{fingerprint(path)}"


def load_feature_networks(
    inception: str | None, clip: str | None, fid_size: int | None, mesh: Any
) -> FeatureNetworks:
    """Load the FID Inception weights file and/or a CLIP model folder; params replicated on ``mesh``."""
    from instaflow_jax.weights.clip_model import load_clip_model, load_clip_tokenizer
    from instaflow_jax.weights.inception import load_fid_inception_params

    params, nets = {}, FeatureNetworks(params={}, fid_size=fid_size)
    if inception is not None:
        params["inception"] = load_fid_inception_params(inception)
        nets.inception_id = _weights_id(inception)
    if clip is not None:
        model, params["clip"], nets.clip_preprocessing = load_clip_model(clip)
        nets.clip_model, nets.clip_tokenizer = model, load_clip_tokenizer(clip)
        nets.clip_id = _weights_id(clip)
    nets.params = jax.device_put(params, replicated(mesh))
    return nets
