"""Reading and writing diffusers folders: safetensors, msgpack and .bin, PyTorch ↔ Flax names."""

from instaflow_jax.weights.convert import WeightsMismatchError
from instaflow_jax.weights.folder import load_component, save_component
from instaflow_jax.weights.safetensors_io import SafetensorsError

__all__ = ["SafetensorsError", "WeightsMismatchError", "load_component", "save_component"]
