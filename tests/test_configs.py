"""Every shipped config variant builds a valid job; the launch scripts and entry points parse."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from instaflow_jax.config_utils import defaults_config, from_dict
from instaflow_jax.examples.toy import expand_variant
from instaflow_jax.examples.toy.config import get_config as toy_config
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
    bad = load_config("triplets_sd15", variant)
    bad.teacher.solver = (
        "ddim"  # refused when the job is read, before a teacher loads or a manifest is written
    )
    with pytest.raises(ValueError, match="unknown solver 'ddim'"):
        TripletJob.from_config(bad)


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


def flat_keys(config) -> set[str]:
    return {
        f"{key}.{sub}" if sub else key
        for key, value in config.items()
        for sub in (flat_keys(value) if hasattr(value, "items") else [""])
    }


@dataclasses.dataclass(frozen=True)
class SampleLike:
    every: int = 3


def test_defaults_config_is_the_inverse_of_from_dict():
    """configs/base.py's starting points: the dataclass defaults, nested, tuples kept."""
    for cls in (TrainConfig, TripletJob):
        config = defaults_config(cls)
        assert from_dict(cls, config) == cls()
    config = defaults_config(TrainConfig)
    assert isinstance(config.sample.prompts, tuple) and config.data.prompts.kind == "text"

    @dataclasses.dataclass(frozen=True)
    class Required:
        steps: int
        sample: SampleLike

    config = defaults_config(Required)
    assert config.steps is None and config.sample.every == 3
    config.steps = 5  # a typed placeholder: set later, e.g. by --config.steps=5
    assert from_dict(Required, config) == Required(5, SampleLike())


@pytest.mark.parametrize(
    "name, variants",
    [
        ("triplets_sd15", ["", "2rf", "tiny", "tiny_2rf"]),
        ("reflow_sd15", ["", "stage2", "tiny"]),
        ("distill_sd15", ["", "lpips", "direct", "tiny", "tiny_lpips"]),
    ],
)
def test_configs_have_exactly_the_dataclass_keys(name, variants):
    """The config files start from the dataclass defaults: every key, none added or lost."""
    cls = TripletJob if name.startswith("triplets") else TrainConfig
    for variant in variants:
        assert flat_keys(load_config(name, variant)) == flat_keys(defaults_config(cls))


def test_config_files_load_by_path_from_another_directory(tmp_path):
    """As the CLIs load them (config_flags, by path), with the repository root not on sys.path and
    the user's own top-level ``configs`` package in the working directory: ours never import it,
    and leave sys.path alone."""
    decoy = tmp_path / "configs"
    decoy.mkdir()
    (decoy / "__init__.py").write_text('raise ImportError("the user\'s own configs package was imported")\n')
    script = """
import json, sys
from absl import flags
from ml_collections import config_flags
specs = sys.argv[1:]
path_before = list(sys.path)
for i, spec in enumerate(specs):
    config_flags.DEFINE_config_file(f"c{i}", spec, lock_config=True)
flags.FLAGS(sys.argv[:1])
loaded = {spec: flags.FLAGS[f"c{i}"].value.to_dict() for i, spec in enumerate(specs)}
assert sys.path == path_before, "a config file changed sys.path"
assert "configs" not in sys.modules
print(json.dumps(loaded))
"""
    specs = ("distill_sd15.py:tiny", "distill_sd15.py:lpips", "reflow_sd15.py", "triplets_sd15.py:tiny")
    specs = [os.path.relpath(os.path.join(ROOT, "configs", spec), tmp_path) for spec in specs]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", script, *specs], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.splitlines()[-1])
    for spec, values in loaded.items():
        name, _, variant = os.path.basename(spec).partition(".py")
        expected = json.loads(json.dumps(load_config(name, variant.removeprefix(":")).to_dict()))
        assert values == expected, spec


def test_a_missing_sibling_config_names_the_file(tmp_path):
    from instaflow_jax.config_utils import load_sibling_config

    with pytest.raises(FileNotFoundError, match=r"nope\.py not found"):
        load_sibling_config(str(tmp_path / "mine.py"), "nope")


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
    # The script calls plain `python`: this interpreter's, also from a venv that is not activated.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = dict(os.environ, JAX_PLATFORMS="cpu", PATH=path)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "exported pipeline" in done.stdout
    assert (workdir / "export" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.parametrize("objective, solver", [("reflow", "euler"), ("teacher_pretrain", "dpmpp2m")])
def test_configs_saved_by_earlier_versions_still_resume_and_export(objective, solver):
    """A checkpoint's config from before the toy's start options left the trainer (and before
    sample.solver was explicit) reads as today's config, with no difference a resume would refuse."""
    from instaflow_jax.train.checkpoint import config_differences
    from instaflow_jax.train.config import upgrade_saved_config

    current = dataclasses.asdict(
        TrainConfig.from_config(
            {
                "init_from": "x",
                "objective": objective,
                "data": {"kind": "images" if objective == "teacher_pretrain" else "triplets"},
                "sample": {"solver": solver},
            }
        )
    )
    saved = {**current, "init_unet_from_scratch": True, "init_output_sign": -1}
    saved["sample"] = {k: v for k, v in current["sample"].items() if k != "solver"}
    with pytest.raises(Exception, match="init_output_sign"):
        TrainConfig.from_config(saved)  # what export and resume met before the upgrade
    upgraded = upgrade_saved_config(saved)
    assert TrainConfig.from_config(upgraded).sample.solver == solver
    assert config_differences(upgraded, current, TrainConfig.RESUMABLE_CHANGES) == []
