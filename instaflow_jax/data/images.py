"""Image datasets for teacher pre-training, found by name: ``register_image_dataset`` /
``make_image_dataset``. A dataset's ``read(indices)`` returns ``images`` float32 [k, H, W, 3] in
[0, 1], ``prompt`` (k strings) and ``index``.

``data.images`` is a registered name or an import path ``"package.module:Factory"``, imported on
demand (the small-scale reproduction's shapes: ``"instaflow_jax.examples.toy.data:ToyShapes"``)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

_FACTORIES: dict[str, Callable[..., Any]] = {}


def register_image_dataset(name: str) -> Callable:
    """Decorator: ``factory(num_images=, seed=, height=, width=)`` makes the dataset ``name``."""

    def register(factory: Callable[..., Any]) -> Callable[..., Any]:
        _FACTORIES[name] = factory
        return factory

    return register


def _import_factory(path: str) -> Callable[..., Any]:
    """``"package.module:attribute"`` → that attribute, the module imported now."""
    module_name, _, attribute = path.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"image dataset {path!r} cannot be imported: {err}") from err
    if not callable(factory):
        raise ValueError(f"image dataset {path!r} is not a class or function.")
    return factory


def make_image_dataset(name: str, num_images: int, seed: int, height: int, width: int) -> Any:
    """The dataset ``name`` (registered, or ``"module:attribute"``)."""
    if name in _FACTORIES:
        factory = _FACTORIES[name]
    elif ":" in name:
        factory = _import_factory(name)
    else:
        raise ValueError(
            f"unknown image dataset {name!r}; registered: {sorted(_FACTORIES)}, "
            "or give an import path 'package.module:Factory'."
        )
    return factory(num_images=num_images, seed=seed, height=height, width=width)
