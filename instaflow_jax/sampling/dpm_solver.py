"""The SD teacher's solver: multistep DPM-Solver++ (order 2) for an ε-prediction UNet.

Matches diffusers ``DPMSolverMultistepScheduler`` with its defaults (``algorithm_type="dpmsolver++"``,
``solver_order=2``, ``solver_type="midpoint"``, ``lower_order_final=True``,
``final_sigmas_type="zero"``, ``timestep_spacing="linspace"``): for 25 steps the UNet sees
timesteps 999, 959, …, 40; the first step and the final step (to σ = 0) are first order.

The schedule is precomputed in numpy (float64, stored float32); the loop is a ``lax.scan`` whose
per-step update (:func:`dpm_solver_step`, the one step both the sampler and the trajectory use) is
``x ← r·x + φ·x̂0 + ½·φ·w·(x̂0 − x̂0_prev)`` with
``x̂0 = (x − σ_s·ε) / α_s``, ``r = σ_t/σ_s``, ``φ = α_t (1 − e^{−h})`` and ``w = h / h_prev`` on
second-order steps (0 otherwise), ``h`` the step in log-SNR λ = log(α/σ).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from instaflow_jax.sampling.velocity import Field


def alphas_cumprod(config: Mapping[str, Any]) -> np.ndarray:
    """ᾱ_t for t = 0 … T−1 from a diffusers scheduler config (scaled-linear or linear betas)."""
    n = int(config.get("num_train_timesteps", 1000))
    start, end = float(config.get("beta_start", 0.00085)), float(config.get("beta_end", 0.012))
    schedule = config.get("beta_schedule", "scaled_linear")
    if config.get("trained_betas") is not None:
        betas = np.asarray(config["trained_betas"], np.float32)
    elif schedule == "scaled_linear":
        betas = np.linspace(start**0.5, end**0.5, n, dtype=np.float32) ** 2
    elif schedule == "linear":
        betas = np.linspace(start, end, n, dtype=np.float32)
    else:
        raise ValueError(f"beta_schedule {schedule!r} is not supported; expected scaled_linear or linear.")
    return np.cumprod(1.0 - betas, dtype=np.float32)


def solver_timesteps(num_steps: int, num_train: int, spacing: str, steps_offset: int = 0) -> np.ndarray:
    """Integer timesteps (descending) chosen like diffusers' ``set_timesteps``."""
    if spacing == "linspace":
        steps = np.linspace(0, num_train - 1, num_steps + 1).round()[::-1][:-1]
    elif spacing == "leading":
        ratio = num_train // (num_steps + 1)
        steps = (np.arange(0, num_steps + 1) * ratio).round()[::-1][:-1] + steps_offset
    elif spacing == "trailing":
        steps = np.arange(num_train, 0, -num_train / num_steps).round() - 1
    else:
        raise ValueError(f"timestep_spacing {spacing!r}; expected linspace, leading or trailing.")
    return steps.astype(np.int64)


@dataclasses.dataclass(frozen=True)
class DPMSolverSchedule:
    """Per-step constants of DPM-Solver++(2M), each a float32 array [num_steps]."""

    timesteps: np.ndarray  # UNet timesteps (integer-valued)
    alpha_s: np.ndarray
    sigma_s: np.ndarray
    ratio: np.ndarray  # σ_t / σ_s
    phi: np.ndarray  # α_t (1 − e^{−h})
    weight: np.ndarray  # h / h_prev on second-order steps, else 0

    @classmethod
    def create(cls, scheduler_config: Mapping[str, Any], num_steps: int) -> DPMSolverSchedule:
        """Schedule for ``num_steps`` steps of the noise schedule in ``scheduler_config``."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be ≥ 1, got {num_steps}.")
        prediction = scheduler_config.get("prediction_type", "epsilon")
        if prediction != "epsilon":
            raise ValueError(f"the SD teacher solver needs an ε-prediction model, got {prediction!r}.")
        ac = alphas_cumprod(scheduler_config)
        steps = solver_timesteps(
            num_steps,
            len(ac),
            scheduler_config.get("timestep_spacing", "linspace"),
            int(scheduler_config.get("steps_offset", 0)),
        )
        if np.any(np.diff(steps) >= 0):
            raise ValueError(
                f"DPM-Solver++ cannot take {num_steps} steps on a {len(ac)}-timestep noise schedule: "
                f"its timesteps would repeat and the step sizes become 0 (use fewer than {len(ac)} steps; "
                "25 is the SD default)."
            )
        all_sigmas = ((1 - ac) / ac) ** 0.5
        sigmas = np.interp(steps, np.arange(len(all_sigmas)), all_sigmas)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32).astype(np.float64)
        alphas = 1.0 / np.sqrt(sigmas**2 + 1.0)
        vp_sigmas = sigmas * alphas
        with np.errstate(divide="ignore"):
            lambdas = np.log(alphas) - np.log(vp_sigmas)  # +inf at the final σ = 0
        h = lambdas[1:] - lambdas[:-1]
        ratio = vp_sigmas[1:] / vp_sigmas[:-1]
        phi = alphas[1:] * -np.expm1(-h)
        weight = np.zeros(num_steps)
        second = np.arange(num_steps)
        second = (second >= 1) & (second < num_steps - 1)  # first and final steps are first order
        weight[second] = h[second] / h[np.flatnonzero(second) - 1]
        f32 = lambda x: np.asarray(x, np.float32)
        coefficients = (f32(steps), f32(alphas[:-1]), f32(vp_sigmas[:-1]), f32(ratio), f32(phi), f32(weight))
        if not all(np.all(np.isfinite(c)) for c in coefficients):
            raise ValueError(
                f"DPM-Solver++ with {num_steps} steps gives non-finite coefficients on this schedule."
            )
        return cls(*coefficients)


def schedule_array(schedule: DPMSolverSchedule) -> jax.Array:
    """The schedule's per-step constants as one float32 array [num_steps, 6], the rows a
    ``lax.scan`` over :func:`dpm_solver_step` consumes (fields in declaration order)."""
    return jnp.stack([jnp.asarray(getattr(schedule, f.name)) for f in dataclasses.fields(schedule)], axis=1)


def dpm_solver_step(
    eps_field: Field, x: jax.Array, x0_prev: jax.Array, c: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """One DPM-Solver++(2M) step from ``x`` [B, h, w, C] with the constants ``c`` [6] (a row of
    :func:`schedule_array`) and the previous step's data estimate ``x0_prev`` (zeros at the
    first step, whose weight is 0): returns (the next state, this step's data estimate x̂0)."""
    t, alpha_s, sigma_s, ratio, phi, weight = (c[i] for i in range(6))
    x0 = (x - sigma_s * eps_field(x, t).astype(jnp.float32)) / alpha_s
    return ratio * x + phi * x0 + 0.5 * phi * weight * (x0 - x0_prev), x0


def _scan(
    eps_field: Field, x_t: jax.Array, schedule: DPMSolverSchedule, keep_states: bool = False
) -> tuple[jax.Array, jax.Array | None]:
    """(final state, the states before each step [N, B, …] or None) of the solver from ``x_t``."""

    def step(carry, c):
        x, x0_prev = carry
        return dpm_solver_step(eps_field, x, x0_prev, c), (x if keep_states else None)

    x = x_t.astype(jnp.float32)
    (last, _), states = jax.lax.scan(step, (x, jnp.zeros_like(x)), schedule_array(schedule))
    return last, states


def dpm_solver_sample(eps_field: Field, x_t: jax.Array, schedule: DPMSolverSchedule) -> jax.Array:
    """Solve SD's probability-flow ODE from noise ``x_t`` [B, h, w, C] to a clean latent.

    ``eps_field(x, t_unet)`` predicts ε (e.g. ``unet_field`` of the SD UNet, with CFG). The
    initial noise scale of this scheduler is 1, so ``x_t`` is plain N(0, I) noise.
    """
    return _scan(eps_field, x_t, schedule)[0]


def rf_times(schedule: DPMSolverSchedule) -> np.ndarray:
    """Rectified-flow time of each solver state (start of every step, then the end), [N + 1].

    A VP state x = α·x̂0 + σ·ε, divided by α + σ, is t·x̂0 + (1 − t)·ε with t = α / (α + σ):
    the interpolation of rectified flow between noise (t = 0) and data (t = 1).
    """
    alphas = np.concatenate([schedule.alpha_s, [1.0]]).astype(np.float64)
    sigmas = np.concatenate([schedule.sigma_s, [0.0]]).astype(np.float64)
    return alphas / (alphas + sigmas)


def dpm_solver_trajectory(
    eps_field: Field, x_t: jax.Array, schedule: DPMSolverSchedule
) -> tuple[jax.Array, np.ndarray]:
    """The solver's states mapped to rectified-flow coordinates: (Z [N + 1, B, …], t [N + 1]).

    ``Z_k = x_k / (α_k + σ_k)`` at time ``t_k = α_k / (α_k + σ_k)`` (see :func:`rf_times`), so
    the SD teacher's flow can be compared with a rectified flow, e.g. for straightness.
    """
    last, states = _scan(eps_field, x_t, schedule, keep_states=True)
    xs = jnp.concatenate([states, last[None]], axis=0)
    scale = np.concatenate([schedule.alpha_s + schedule.sigma_s, [1.0]]).astype(np.float32)
    return xs / jnp.asarray(scale).reshape((-1,) + (1,) * (xs.ndim - 1)), rf_times(schedule)
