"""Image datasets for teacher pre-training, by name: ``register_image_dataset`` /
``make_image_dataset``. A dataset's ``read(indices)`` returns ``images`` float32 [k, H, W, 3] in
[0, 1], ``prompt`` (k strings) and ``index``; the toy example registers ``toy_shapes``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

_FACTORIES: dict[str, Callable[..., Any]] = {}


def register_image_dataset(name: str) -> Callable:
    def register(factory: Callable[..., Any]) -> Callable[..., Any]:
        _FACTORIES[name] = factory
        return factory

    return register


def make_image_dataset(name: str, num_images: int, seed: int, height: int, width: int) -> Any:
    if name not in _FACTORIES:
        with contextlib.suppress(ImportError):
            import instaflow_jax.examples.toy_data  # noqa: F401  (registers the toy datasets)
    if name not in _FACTORIES:
        raise ValueError(f"unknown image dataset {name!r}; registered: {sorted(_FACTORIES)}.")
    return _FACTORIES[name](num_images=num_images, seed=seed, height=height, width=width)
