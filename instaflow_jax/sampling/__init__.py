"""Pure samplers: velocity fields with CFG, Euler (1…N steps), DPM-Solver++, straightness, slerp,
and text → image as one function (``text_to_image``)."""

from instaflow_jax.sampling.dpm_solver import (
    DPMSolverSchedule,
    dpm_solver_sample,
    dpm_solver_step,
    dpm_solver_trajectory,
    rf_times,
    schedule_array,
)
from instaflow_jax.sampling.euler import euler_sample, euler_timesteps, euler_trajectory, one_step
from instaflow_jax.sampling.interpolation import slerp, slerp_path
from instaflow_jax.sampling.noise import initial_noise, sample_keys
from instaflow_jax.sampling.straightness import (
    straightness,
    trajectory_straightness,
    trajectory_velocity_change,
    velocity_change,
)
from instaflow_jax.sampling.text_to_image import (
    SamplerSpec,
    TeacherSpec,
    decode_latents,
    encode_text,
    make_generate_fn,
    solve,
    text_field,
)
from instaflow_jax.sampling.velocity import Field, guidance_enabled, guide, unet_field

__all__ = [
    "DPMSolverSchedule",
    "Field",
    "SamplerSpec",
    "TeacherSpec",
    "decode_latents",
    "dpm_solver_sample",
    "dpm_solver_step",
    "dpm_solver_trajectory",
    "encode_text",
    "euler_sample",
    "euler_timesteps",
    "euler_trajectory",
    "guidance_enabled",
    "guide",
    "initial_noise",
    "make_generate_fn",
    "one_step",
    "rf_times",
    "sample_keys",
    "schedule_array",
    "slerp",
    "slerp_path",
    "solve",
    "straightness",
    "text_field",
    "trajectory_straightness",
    "trajectory_velocity_change",
    "unet_field",
    "velocity_change",
]
