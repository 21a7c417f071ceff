"""A small CNN trained on the toy data: the evaluation's "Inception" and "CLIP".

It predicts the four attributes (shape, colour, size, position) of an image. Its 64-d penultimate
features stand in for Inception features in FID, and its predictions stand in for CLIP in the
prompt-alignment score: the fraction of attributes named in a prompt that it recognises in the
image generated for that prompt.
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from instaflow_jax.examples.toy.data import ATTRIBUTES, ToyShapes
from instaflow_jax.files import write_bytes_atomic

FEATURES = 64


class AttributeClassifier(nn.Module):
    """Images [B, S, S, 3] in [0, 1] → (features [B, 64], logits per attribute)."""

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        h = images * 2.0 - 1.0
        for width in (32, 64, 64):
            h = nn.gelu(nn.Conv(width, (3, 3))(h))
            h = nn.gelu(nn.Conv(width, (3, 3), strides=(2, 2))(h))
        h = h.reshape(h.shape[0], -1)
        features = nn.gelu(nn.Dense(FEATURES)(h))
        logits = {
            name: nn.Dense(len(values), name=f"head_{name}")(features) for name, values in ATTRIBUTES.items()
        }
        return features, logits


def _loss(params: Any, images: jax.Array, labels: jax.Array) -> jax.Array:
    _, logits = AttributeClassifier().apply(params, images)
    losses = [
        optax.softmax_cross_entropy_with_integer_labels(logits[name], labels[:, i]).mean()
        for i, name in enumerate(ATTRIBUTES)
    ]
    return sum(losses) / len(losses)


def train_classifier(image_size: int, steps: int, batch: int = 64, seed: int = 1234) -> Any:
    """Train on fresh toy samples (seed ``seed``, never used for generation training)."""
    data = ToyShapes(steps * batch, seed=seed, height=image_size, width=image_size)
    params = AttributeClassifier().init(jax.random.key(seed), jnp.zeros((1, image_size, image_size, 3)))
    optimizer = optax.adam(2e-3)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, images, labels):
        grads = jax.grad(_loss)(params, images, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for i in range(steps):
        chunk = data.read(np.arange(i * batch, (i + 1) * batch))
        params, opt_state = step(params, opt_state, chunk["images"], chunk["labels"])
    return params


def load_or_train(path: str, image_size: int, steps: int) -> Any:
    """The classifier saved at ``path``, or a new one trained and saved there."""
    template = AttributeClassifier().init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)))
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return serialization.from_bytes(template, f.read())
    params = train_classifier(image_size, steps)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_bytes_atomic(path, serialization.to_bytes(params))
    return params


@jax.jit
def _apply(params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    features, logits = AttributeClassifier().apply(params, images)
    return features, jnp.stack([jnp.argmax(logits[name], -1) for name in ATTRIBUTES], axis=1)


def features_and_predictions(
    params: Any, images: np.ndarray, batch: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, 64] float64, predicted attribute indices [N, 4]) for images in [0, 1]."""
    outputs = [_apply(params, jnp.asarray(images[i : i + batch])) for i in range(0, len(images), batch)]
    features = np.concatenate([np.asarray(f) for f, _ in outputs]).astype(np.float64)
    return features, np.concatenate([np.asarray(p) for _, p in outputs])
