"""instaflow-jax: InstaFlow one-step text-to-image generation in JAX/Flax."""

from instaflow_jax.controlnet import ControlNet, load_controlnet
from instaflow_jax.image_ops import canny
from instaflow_jax.pipeline import Pipeline, load_pipeline
from instaflow_jax.sampling.dpm_solver import DPMSolverSchedule, dpm_solver_sample
from instaflow_jax.sampling.euler import euler_sample
from instaflow_jax.sampling.text_to_image import (
    SamplerSpec,
    TeacherSpec,
    decode_latents,
    encode_text,
    make_generate_fn,
)
from instaflow_jax.sampling.velocity import unet_field
from instaflow_jax.transfer import transfer
from instaflow_jax.weights.lora import LoRAError

__all__ = [
    "ControlNet",
    "DPMSolverSchedule",
    "LoRAError",
    "Pipeline",
    "SamplerSpec",
    "TeacherSpec",
    "canny",
    "decode_latents",
    "dpm_solver_sample",
    "encode_text",
    "euler_sample",
    "load_controlnet",
    "load_pipeline",
    "make_generate_fn",
    "transfer",
    "unet_field",
]
__version__ = "0.1.0"
