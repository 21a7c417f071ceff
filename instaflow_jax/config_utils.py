"""Configs as data: nested frozen dataclasses built from ml_collections ConfigDicts or dicts.

``from_dict`` rejects unknown keys at any depth with the key's full path and the known keys, so a
misspelled override fails loudly instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigKeyError(ValueError):
    """A config key that the job does not know."""


def to_plain(config: Any) -> Any:
    """ConfigDict / FrozenConfigDict / dataclass → plain dicts, lists and scalars."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    if isinstance(config, Mapping):
        return {k: to_plain(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [to_plain(v) for v in config]
    return config


def from_dict(cls: type[T], raw: Any, path: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, recursing into dataclass-typed fields."""
    raw = to_plain(raw)
    if not isinstance(raw, Mapping):
        raise ConfigKeyError(f"config {path or cls.__name__} must be a mapping, got {type(raw).__name__}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        where = path or "the top level"
        raise ConfigKeyError(
            f"unknown config keys {[path + k for k in unknown]}; {where} takes {sorted(fields)}."
        )
    kwargs = {}
    for key, value in raw.items():
        kind = hints[key]
        if dataclasses.is_dataclass(kind) and isinstance(value, Mapping):
            value = from_dict(kind, value, f"{path}{key}.")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)
