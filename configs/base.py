"""The starting point of every job config: the jobs' dataclass defaults as ConfigDicts."""

import os

from ml_collections import ConfigDict

from instaflow_jax.config_utils import defaults_config

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def train_defaults() -> ConfigDict:
    """``TrainConfig()``'s defaults (instaflow_jax/train/config.py), keys and nesting included."""
    from instaflow_jax.train.config import TrainConfig

    return defaults_config(TrainConfig)


def triplet_defaults() -> ConfigDict:
    """``TripletJob()``'s defaults (instaflow_jax/generate_triplets.py), keys and nesting included."""
    from instaflow_jax.generate_triplets import TripletJob

    return defaults_config(TripletJob)


def unknown_variant(variant: str, known: tuple[str, ...]) -> ValueError:
    """The error for a ``:VARIANT`` suffix that the config file does not define."""
    names = ", ".join(repr(name) for name in known[:-1]) + f" or {known[-1]!r}"
    return ValueError(f"unknown variant {variant!r}; expected {names}.")
