"""Every shipped config variant builds a valid job; the launch scripts and entry points parse."""

from __future__ import annotations

import importlib.util
import os
import subprocess

import pytest

from instaflow_jax.examples.toy import expand_variant
from instaflow_jax.examples.toy_config import get_config as toy_config
from instaflow_jax.generate_triplets import TripletJob
from instaflow_jax.train.config import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, variant: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


@pytest.mark.parametrize("variant", ["", "2rf", "tiny", "tiny_2rf"])
def test_triplet_configs(variant):
    job = TripletJob.from_config(load_config("triplets_sd15", variant))
    assert job.teacher.solver == ("euler" if "2rf" in variant else "dpmpp2m")
    assert job.teacher.guidance_scale == (1.5 if "2rf" in variant else 5.0)


@pytest.mark.parametrize(
    "name, variant, objective",
    [
        ("reflow_sd15", "", "reflow"),
        ("reflow_sd15", "stage2", "reflow"),
        ("reflow_sd15", "tiny", "reflow"),
        ("distill_sd15", "", "distill"),
        ("distill_sd15", "lpips", "distill"),
        ("distill_sd15", "direct", "direct_distill"),
        ("distill_sd15", "tiny", "distill"),
        ("distill_sd15", "tiny_lpips", "distill"),
    ],
)
def test_train_configs(name, variant, objective):
    config = TrainConfig.from_config(load_config(name, variant))
    assert config.objective == objective
    if name == "reflow_sd15" and not variant:  # the paper's stage-1 schedule (docs/method.md §4)
        assert (config.batch_size, config.num_steps, config.optimizer.learning_rate) == (64, 70_000, 1e-6)
        assert (config.ema_decay, config.optimizer.clip_norm, config.optimizer.warmup_steps) == (
            0.9999,
            1.0,
            1000,
        )
        assert config.prompt_dropout == 0.1
    if variant == "lpips":
        assert config.loss == "lpips" and config.lpips_resize == 224


def test_unknown_variants_are_refused():
    for name in ("triplets_sd15", "reflow_sd15", "distill_sd15"):
        with pytest.raises(ValueError, match="unknown variant"):
            load_config(name, "huge")
    with pytest.raises(ValueError, match="unknown toy variant"):
        toy_config("huge")


def test_toy_variants_and_variant_flag():
    for variant in ("", "tiny", "quality"):
        config = toy_config(variant)
        assert config.teacher.batch_size % 2 == 0 and config.eval.num_samples >= 32
    path = "/pkg/toy_config.py"
    assert expand_variant(["toy", "--variant", "tiny", "--workdir=x"], path) == [
        "toy",
        f"--config={path}:tiny",
        "--workdir=x",
    ]
    assert expand_variant(["toy", "--variant=quality"], path) == ["toy", f"--config={path}:quality"]


@pytest.mark.parametrize("script", ["single_gpu.sh", "multi_gpu.sh", "slurm_multi_host.sbatch", "tpu_pod.sh"])
def test_launch_scripts_are_valid_bash_and_demand_their_arguments(script):
    path = os.path.join(ROOT, "launch", script)
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    if script.endswith(".sh"):
        done = subprocess.run(["bash", path], capture_output=True, text=True)
        assert done.returncode != 0 and "usage:" in done.stderr


def test_single_gpu_launch_runs_the_tiny_distillation(tmp_path):
    """launch/single_gpu.sh (and so multi_gpu.sh, the same command) with configs/distill_sd15.py:tiny."""
    workdir = tmp_path / "run"
    command = [
        "bash",
        os.path.join(ROOT, "launch", "single_gpu.sh"),
        "configs/distill_sd15.py:tiny",
        str(workdir),
    ]
    command += ["--config.num_steps=4", "--config.sample.every=0", "--config.checkpoint_every=2"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "exported pipeline" in done.stdout
    assert (workdir / "export" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
