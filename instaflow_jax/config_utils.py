"""Configs as data: nested frozen dataclasses built from ml_collections ConfigDicts or dicts.

``from_dict`` rejects unknown keys at any depth with the key's full path and the known keys, so a
misspelled override fails loudly instead of being ignored. ``defaults_config`` goes the other way:
a dataclass's defaults as a ConfigDict, the starting point of the job configs in ``configs/``, which
import each other with ``load_sibling_config``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import sys
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from ml_collections import ConfigDict, config_dict

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


def defaults_config(cls: type) -> ConfigDict:
    """The defaults of dataclass ``cls`` as a ConfigDict with the same keys (``from_dict``'s inverse).

    Nested dataclasses become nested ConfigDicts and tuples stay tuples. A field without a default
    becomes a typed placeholder (``None`` until set; a command-line override still parses) or, for
    a dataclass-typed field, that dataclass's defaults.
    """
    hints = typing.get_type_hints(cls)
    config = ConfigDict()
    for field in dataclasses.fields(cls):
        if field.default is not dataclasses.MISSING:
            config[field.name] = _as_config_value(field.default)
        elif field.default_factory is not dataclasses.MISSING:
            config[field.name] = _as_config_value(field.default_factory())
        elif dataclasses.is_dataclass(hints[field.name]):
            config[field.name] = defaults_config(hints[field.name])
        elif isinstance(hints[field.name], type):
            config[field.name] = config_dict.placeholder(hints[field.name])
        else:
            raise TypeError(f"{cls.__name__}.{field.name} has no default and no plain type to hold.")
    return config


def _as_config_value(value: Any) -> Any:
    """A dataclass instance → ConfigDict of its values (recursively); anything else as is."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = dataclasses.fields(value)
        return ConfigDict({f.name: _as_config_value(getattr(value, f.name)) for f in fields})
    return value


def load_sibling_config(config_file: str, name: str) -> types.ModuleType:
    """The config file ``NAME.py`` in the folder of ``config_file`` (a config's ``__file__``).

    Config files are loaded by path (``--config=configs/reflow_sd15.py``) from any directory, so
    they import each other by path too: ``sys.path`` is left alone, and another top-level package
    called ``configs`` cannot shadow ours. Each file is executed once per process.
    """
    path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} not found (imported by {config_file}).")
    key = f"_instaflow_jax_config_{name}_{hashlib.sha1(path.encode()).hexdigest()[:12]}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[key]
            raise
    return sys.modules[key]
