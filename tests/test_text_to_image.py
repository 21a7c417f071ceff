"""The one text → image path: stored triplets and online targets agree, solvers are chosen by a
field, and the research API is exported from the package top."""

from __future__ import annotations

import numpy as np
import pytest

import instaflow_jax
from instaflow_jax.conventions import nchw_to_nhwc
from instaflow_jax.sampling.text_to_image import (
    SD_TEACHER,
    SamplerSpec,
    TeacherSpec,
)

from conftest import assert_close

PROMPTS = ["a small red circle at the top left", "a photo of a cat"]


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    return instaflow_jax.load_pipeline(tiny_pipeline_dir)


@pytest.mark.parametrize(
    "teacher",
    [TeacherSpec("dpmpp2m", 3, 5.0), TeacherSpec("euler", 3, 1.5), TeacherSpec("euler", 2, 0.0)],
    ids=["sd", "2rf", "no-cfg"],
)
def test_online_targets_equal_the_triplet_jobs_latents(pipe, teacher):
    """``generate_triplets`` stores ``Pipeline.generate`` latents; distillation computes them in
    the loss. The same TeacherSpec gives the same X1 through both."""
    from instaflow_jax.text import tokenize
    from instaflow_jax.train.objectives import make_teacher_targets
    from instaflow_jax.train.objectives.common import frozen_context

    noise = np.random.default_rng(3).standard_normal((2, 4, 8, 8)).astype(np.float32)
    stored = pipe.generate(
        PROMPTS, num_steps=teacher.num_steps, guidance_scale=teacher.guidance_scale,
        negative_prompt=teacher.negative_prompt, latents=noise, height=64, width=64,
        solver=teacher.solver, output_type="latent",
    )  # fmt: skip
    frozen = {
        "text_encoder": pipe.params["text_encoder"],
        "vae": pipe.params["vae"],
        "uncond_ids": tokenize(pipe.tokenizer, [""]),
        "teacher_unet": pipe.params["unet"],
    }
    targets = make_teacher_targets(pipe.modules, teacher, pipe.scheduler_config)
    context = frozen_context(pipe.modules, frozen, pipe.tokenize(PROMPTS))
    online = targets(frozen, context, nchw_to_nhwc(noise))
    assert_close(np.asarray(online), nchw_to_nhwc(stored), 1e-5, f"{teacher.solver} targets")


def test_online_targets_refuse_a_negative_prompt(pipe):
    from instaflow_jax.train.objectives import make_teacher_targets

    with pytest.raises(ValueError, match="as the unconditional one, got negative prompt 'blurry'"):
        make_teacher_targets(pipe.modules, TeacherSpec("euler", 2, 1.5, "blurry"))


def test_both_job_configs_make_teacher_specs_with_their_documented_defaults():
    from instaflow_jax.generate_triplets import TeacherConfig as TripletTeacher
    from instaflow_jax.train.config import TeacherConfig as OnlineTeacher

    assert TripletTeacher().spec() == TeacherSpec("dpmpp2m", 25, 5.0, "")
    assert OnlineTeacher().spec() == TeacherSpec("euler", 25, 1.5, "")
    assert SD_TEACHER.sampler() == SamplerSpec(25, "dpmpp2m", True, "latent")
    assert TeacherSpec("euler", 4, 1.0).sampler("image") == SamplerSpec(4, "euler", False, "image")
    with pytest.raises(ValueError, match="unknown solver 'ddim'"):
        TeacherSpec("ddim", 25, 5.0)


def test_the_sample_grid_solver_is_a_config_field():
    from configs.base import train_defaults
    from instaflow_jax.train.config import TrainConfig

    def spec(**overrides):
        config = train_defaults()
        config.init_from = "x"
        config.update(overrides)
        return TrainConfig.from_config(config).sample_spec()

    assert spec() == SamplerSpec(1, "euler", False, "image")
    assert spec(objective="distill").solver == "euler"  # the default, whatever the objective
    explicit = spec(sample={"solver": "dpmpp2m", "guidance_scale": 2.0})
    assert explicit == SamplerSpec(1, "dpmpp2m", True, "image")
    for solver in ("ddim", ""):  # no solver is implied by the objective
        with pytest.raises(ValueError, match=rf"sample\.solver '{solver}'"):
            spec(sample={"solver": solver})
    pretrain = {"objective": "teacher_pretrain", "data": {"kind": "images", "images": "test_colors"}}
    with pytest.raises(ValueError, match=r"Euler cannot sample: set sample\.solver='dpmpp2m'"):
        spec(**pretrain)  # an ε-prediction UNet's grids with Euler would be noise: refused loudly
    assert spec(**pretrain, sample={"solver": "dpmpp2m"}).solver == "dpmpp2m"


def test_the_research_api_is_exported_from_the_package_top():
    from instaflow_jax.sampling import text_to_image

    for name in ("make_generate_fn", "SamplerSpec", "TeacherSpec", "encode_text", "decode_latents"):
        assert getattr(instaflow_jax, name) is getattr(text_to_image, name)
    for name in ("unet_field", "euler_sample", "dpm_solver_sample", "DPMSolverSchedule"):
        assert name in instaflow_jax.__all__ and hasattr(instaflow_jax, name)
