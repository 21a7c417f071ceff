"""Samplers against PyTorch references and closed forms.

(a) N-step Euler (the InstaFlow reference loop) written with the PyTorch diffusers UNet, VAE and
    text encoder on the same weights and noise; (b) the SD teacher against diffusers'
    ``StableDiffusionPipeline`` + ``DPMSolverMultistepScheduler``; (c) closed-form fields;
    (d) no recompilation for new prompts, seeds and guidance values.
"""

from __future__ import annotations

import jax
import jax.monitoring
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import instaflow_jax
from instaflow_jax.sampling.dpm_solver import DPMSolverSchedule, dpm_solver_sample
from instaflow_jax.sampling.euler import euler_sample, euler_timesteps, one_step
from instaflow_jax.sampling.straightness import straightness

from conftest import assert_close

PROMPTS = ["a small red circle at the top left", "a photo of a cat"]


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    return instaflow_jax.load_pipeline(tiny_pipeline_dir)


@pytest.fixture(scope="module")
def torch_pipe(tiny_pipeline_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)


@pytest.fixture(scope="module")
def noise():
    return np.random.default_rng(7).standard_normal((2, 4, 8, 8)).astype(np.float32)


def _torch_context(tp, prompts):
    ids = tp.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    return tp.text_encoder(ids.input_ids)[0]


@torch.no_grad()
def torch_euler(tp, prompts, latents, steps, guidance, negative):
    """The InstaFlow reference loop (pipeline_rf.py) on the PyTorch modules."""
    cond = _torch_context(tp, prompts)
    cfg = guidance > 1.0
    if cfg:
        context = torch.cat([_torch_context(tp, [negative] * len(prompts)), cond])
    z = torch.from_numpy(latents)
    dt = 1.0 / steps
    for i in range(steps):
        t = (1.0 - i / steps) * 1000.0
        if cfg:
            v = tp.unet(torch.cat([z, z]), torch.full((2 * len(prompts),), t), context).sample
            v_neg, v_text = v.chunk(2)
            v = v_neg + guidance * (v_text - v_neg)
        else:
            v = tp.unet(z, torch.full((len(prompts),), t), cond).sample
        z = z + dt * v
    image = tp.vae.decode(z / tp.vae.config.scaling_factor).sample
    return z.numpy(), (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize(
    "steps, guidance, negative",
    [(1, 0.0, ""), (2, 0.0, ""), (4, 0.0, ""), (1, 1.5, ""), (2, 2.0, "blue"), (4, 1.5, "a dog")],
)
def test_euler_matches_the_reference_loop_in_pytorch(pipe, torch_pipe, noise, steps, guidance, negative):
    ref_latents, ref_images = torch_euler(torch_pipe, PROMPTS, noise, steps, guidance, negative)
    kwargs = dict(
        num_steps=steps, guidance_scale=guidance, negative_prompt=negative, latents=noise, height=64, width=64
    )
    latents = pipe.generate(PROMPTS, output_type="latent", **kwargs)
    images = pipe.generate(PROMPTS, **kwargs)
    assert latents.shape == (2, 4, 8, 8) and images.shape == (2, 64, 64, 3)
    assert images.dtype == np.float32 and images.min() >= 0 and images.max() <= 1
    assert_close(latents, ref_latents, 1e-4, f"latents, {steps} steps, g={guidance}")
    assert_close(images, ref_images, 1e-4, f"images, {steps} steps, g={guidance}")


def test_blockwise_attention_pipeline_matches_the_reference_loop(tiny_pipeline_dir, torch_pipe, noise):
    """Text encoder, UNet and VAE with ``attention_impl="blockwise"``: the one-step program that
    ``instaflow-generate --attention blockwise`` compiles (the tests above run "auto")."""
    blockwise = instaflow_jax.load_pipeline(tiny_pipeline_dir, attention_impl="blockwise")
    _, ref_images = torch_euler(torch_pipe, ["a cat"], noise[:1], 1, 0.0, "")
    images = blockwise.generate(["a cat"], latents=noise[:1], height=64, width=64)
    assert_close(images, ref_images, 1e-4, "blockwise images, 1 step")


def test_guidance_at_or_below_one_is_a_single_conditional_pass(pipe, noise):
    base = pipe.generate(PROMPTS, num_steps=2, guidance_scale=0.0, latents=noise, height=64, width=64)
    for g in (1.0, 0.5):
        same = pipe.generate(
            PROMPTS, num_steps=2, guidance_scale=g, negative_prompt="x", latents=noise, height=64, width=64
        )
        np.testing.assert_array_equal(same, base)


def test_teacher_matches_diffusers_dpm_solver_pipeline(pipe, torch_pipe, noise):
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler.from_config(torch_pipe.scheduler.config)
    torch_pipe.scheduler = scheduler
    kwargs = dict(num_inference_steps=25, guidance_scale=5.0, height=64, width=64)
    with torch.no_grad():
        ref_latents = torch_pipe(
            PROMPTS, latents=torch.from_numpy(noise), output_type="latent", **kwargs
        ).images
        ref_images = torch_pipe(PROMPTS, latents=torch.from_numpy(noise), output_type="np", **kwargs).images
    ours = dict(num_steps=25, guidance_scale=5.0, solver="dpmpp2m", latents=noise, height=64, width=64)
    latents = pipe.generate(PROMPTS, output_type="latent", **ours)
    images = pipe.generate(PROMPTS, **ours)
    np.testing.assert_array_equal(
        DPMSolverSchedule.create(pipe.scheduler_config, 25).timesteps, scheduler.timesteps.numpy()
    )
    assert_close(latents, ref_latents.numpy(), 1e-4, "teacher latents")
    assert_close(images, ref_images, 1e-4, "teacher images")


@pytest.mark.parametrize("steps", [1, 2, 5, 25])
def test_dpm_solver_matches_diffusers_scheduler_on_an_analytic_eps(steps):
    """The solver alone, against diffusers' scheduler stepping the same ε(x, t) function."""
    from diffusers import DPMSolverMultistepScheduler

    config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    scheduler = DPMSolverMultistepScheduler(**config)
    scheduler.set_timesteps(steps)
    eps_np = lambda x, t: 0.3 * np.tanh(x) + 0.1 * np.cos(t / 300.0) * x
    x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    sample = torch.from_numpy(x)
    for t in scheduler.timesteps:
        eps = torch.from_numpy(eps_np(sample.numpy(), float(t)).astype(np.float32))
        sample = scheduler.step(eps, t, sample).prev_sample
    eps_jax = lambda z, t: 0.3 * jnp.tanh(z) + 0.1 * jnp.cos(t / 300.0) * z
    ours = dpm_solver_sample(eps_jax, jnp.asarray(x), DPMSolverSchedule.create(config, steps))
    assert_close(ours, sample.numpy(), 1e-5, f"DPM-Solver++ {steps} steps")


# ------------------------------------------------------------------------------------ closed forms


def test_euler_timesteps_follow_the_instaflow_convention():
    np.testing.assert_allclose(euler_timesteps(4), [1000.0, 750.0, 500.0, 250.0])
    # A field that returns its timestep: z1 = z0 + Σ dt·t_i.
    field = lambda z, t: jnp.full_like(z, t)
    z1 = euler_sample(field, jnp.zeros((1, 2)), 4)
    np.testing.assert_allclose(z1, 625.0)
    np.testing.assert_allclose(one_step(field, jnp.zeros((1, 2))), 1000.0)


def test_straight_field_is_integrated_exactly_in_one_step_and_has_zero_straightness():
    """v(z, t) = (x1 − z)/(1 − t) moves every point straight to x1: one step is exact, S = 0."""
    key1, key2 = jax.random.split(jax.random.key(0))
    x1 = jax.random.normal(key1, (3, 4, 4, 2))
    z0 = jax.random.normal(key2, (3, 4, 4, 2))
    field = lambda z, t_unet: (x1 - z) / (t_unet / 1000.0)  # 1 − t = t_unet / 1000
    np.testing.assert_allclose(one_step(field, z0), x1, atol=1e-5)
    for n in (2, 7):
        np.testing.assert_allclose(euler_sample(field, z0, n), x1, atol=1e-5)
    s, per_sample = straightness(field, z0, 10)
    assert float(s) < 1e-9 and per_sample.shape == (3,)


def test_curved_field_is_not_straight_and_euler_matches_its_closed_form():
    """Rotation v = A z: N Euler steps give (I + A/N)^N z0 exactly; S > 0; one step is wrong."""
    omega = np.pi / 2
    a = np.array([[0.0, -omega], [omega, 0.0]], np.float32)
    field = lambda z, t: z @ jnp.asarray(a).T
    z0 = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    for n in (1, 3, 25):
        closed = np.asarray(z0) @ np.linalg.matrix_power(np.eye(2) + a / n, n).T
        np.testing.assert_allclose(euler_sample(field, z0, n), closed, rtol=1e-5, atol=1e-6)
    exact = np.asarray(z0) @ np.array([[0.0, -1.0], [1.0, 0.0]]).T  # a quarter turn
    assert np.abs(np.asarray(one_step(field, z0)) - exact).max() > 0.5
    assert np.abs(np.asarray(euler_sample(field, z0, 200)) - exact).max() < 0.02
    s, _ = straightness(field, z0, 50)
    # Continuous value: mean over t of |chord − v(t)|², chord = exact − z0, |v| = ω|z0|.
    ts = (np.arange(50) + 0.5) / 50
    chord = exact - np.asarray(z0)
    rot = lambda t: np.array(
        [[np.cos(omega * t), -np.sin(omega * t)], [np.sin(omega * t), np.cos(omega * t)]]
    )
    v = np.stack([np.asarray(z0) @ rot(t).T @ a.T for t in ts])
    assert float(s) > 0.1
    np.testing.assert_allclose(float(s), np.mean((chord[None] - v) ** 2), rtol=0.1)


# ------------------------------------------------------------------------------------ compilation


def test_new_prompts_seeds_and_guidance_compile_nothing(pipe):
    events = []
    listener = lambda name, *args, **kwargs: events.append(name)
    kwargs = dict(num_steps=2, height=64, width=64)
    pipe.generate(PROMPTS, guidance_scale=1.5, seed=0, **kwargs)  # may compile
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        out = pipe.generate(
            ["a blue square", "a horse"], guidance_scale=3.0, seed=5, negative_prompt="red", **kwargs
        )
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    compiles = [e for e in events if "compile" in e or "trace" in e]
    assert compiles == [], f"second generate call compiled: {compiles}"
    assert pipe.last_timings.compile_s == 0.0 and out.shape == (2, 64, 64, 3)


def test_seeds_are_per_sample_and_batch_independent(pipe):
    from instaflow_jax.sampling.noise import initial_noise

    noise = initial_noise(3, np.arange(5), (8, 8, 4))
    np.testing.assert_array_equal(initial_noise(3, np.array([3, 1]), (8, 8, 4)), noise[np.array([3, 1])])
    both = pipe.generate(PROMPTS, seed=3, height=64, width=64, output_type="latent")
    first = pipe.generate(PROMPTS[:1], seed=3, height=64, width=64, output_type="latent")
    np.testing.assert_allclose(first[0], both[0], atol=1e-5)  # batch shape changes rounding only
    other = pipe.generate(PROMPTS, seed=4, height=64, width=64, output_type="latent")
    assert np.abs(other - both).max() > 1e-2


def test_bad_generate_arguments(pipe, noise):
    with pytest.raises(ValueError, match="multiple of 8"):
        pipe.generate(PROMPTS, height=60, width=64)
    with pytest.raises(ValueError, match=r"latents must be NCHW \(2, 4, 8, 8\)"):
        pipe.generate(PROMPTS, latents=noise[:, :, :4], height=64, width=64)
    with pytest.raises(ValueError, match="unknown solver"):
        pipe.generate(PROMPTS, solver="ddim", height=64, width=64)
    with pytest.raises(ValueError, match="3 negative prompts for 2 prompts"):
        pipe.generate(PROMPTS, guidance_scale=2.0, negative_prompt=["a", "b", "c"], height=64, width=64)


def test_non_finite_inputs_and_outputs_are_errors(pipe, noise):
    import dataclasses

    from instaflow_jax.sampling.text_to_image import NonFiniteOutputError

    with pytest.raises(ValueError, match="guidance_scale must be a finite number, got inf"):
        pipe.generate(PROMPTS, guidance_scale=float("inf"), height=64, width=64)
    nan_noise = np.array(noise, copy=True)
    nan_noise[1, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"latents contain NaN or infinity \(samples \[1\]\)"):
        pipe.generate(PROMPTS, latents=nan_noise, height=64, width=64)
    with pytest.raises(ValueError, match="DPM-Solver\\+\\+ cannot take 1000 steps on a 1000-timestep"):
        pipe.generate(PROMPTS, solver="dpmpp2m", num_steps=1000, height=64, width=64)
    with pytest.raises(ValueError, match="seed must lie in 0…4294967295"):
        pipe.generate(PROMPTS, seed=2**32, height=64, width=64)
    unet = jax.tree.map(lambda x: x, pipe.params["unet"])
    unet["conv_out"]["bias"] = unet["conv_out"]["bias"].at[0].set(jnp.nan)
    broken = dataclasses.replace(pipe, params={**pipe.params, "unet": unet}, _compiled={})
    with pytest.raises(
        NonFiniteOutputError,
        match=r"for 2 of 2 samples.*unet weights hold NaN/inf \(e\.g\. \['conv_out'\]\['bias'\]\)",
    ):
        broken.generate(PROMPTS, height=64, width=64)
