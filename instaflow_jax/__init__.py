"""instaflow-jax: InstaFlow one-step text-to-image generation in JAX/Flax."""

from instaflow_jax.controlnet import ControlNet, load_controlnet
from instaflow_jax.image_ops import canny
from instaflow_jax.pipeline import Pipeline, load_pipeline
from instaflow_jax.transfer import transfer
from instaflow_jax.weights.lora import LoRAError

__all__ = ["ControlNet", "LoRAError", "Pipeline", "canny", "load_controlnet", "load_pipeline", "transfer"]
__version__ = "0.1.0"
