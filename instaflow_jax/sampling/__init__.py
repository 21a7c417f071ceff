"""Pure samplers: velocity fields with CFG, Euler (1…N steps), DPM-Solver++, straightness, slerp."""

from instaflow_jax.sampling.dpm_solver import (
    DPMSolverSchedule,
    dpm_solver_sample,
    dpm_solver_trajectory,
    rf_times,
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
from instaflow_jax.sampling.velocity import Field, guide, unet_field, use_cfg

__all__ = [
    "DPMSolverSchedule",
    "Field",
    "dpm_solver_sample",
    "dpm_solver_trajectory",
    "euler_sample",
    "euler_timesteps",
    "euler_trajectory",
    "guide",
    "initial_noise",
    "one_step",
    "rf_times",
    "sample_keys",
    "slerp",
    "slerp_path",
    "straightness",
    "trajectory_straightness",
    "trajectory_velocity_change",
    "unet_field",
    "use_cfg",
    "velocity_change",
]
