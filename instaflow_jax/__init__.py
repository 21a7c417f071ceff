"""instaflow-jax: InstaFlow one-step text-to-image generation in JAX/Flax."""

from instaflow_jax.pipeline import Pipeline, load_pipeline

__all__ = ["Pipeline", "load_pipeline"]
__version__ = "0.1.0"
