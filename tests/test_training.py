"""Training: every objective learns, gradient accumulation changes nothing, exports load in
PyTorch diffusers. Restarts and checkpoints: test_checkpoints.py; multi-process:
test_training_multiprocess.py (they share this file's helpers)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import torch

from instaflow_jax.data.images import register_image_dataset
from instaflow_jax.testing import write_random_lpips_weights
from instaflow_jax.train.trainer import NonFiniteLossError, train_and_evaluate

PROMPTS = ["a small red circle", "a big blue square", "a photo of a cat", "a photo of a dog"] * 2
COLORS = {
    "red": (1.0, 0.1, 0.1),
    "green": (0.1, 0.9, 0.2),
    "blue": (0.1, 0.2, 1.0),
    "yellow": (1.0, 0.9, 0.1),
}


class ColorImages:
    """Images split into a coloured left half and a grey right half: 'a red square' etc."""

    def __init__(self, num_images, seed, height, width, poison=False):
        self.names = list(COLORS)
        self.count, self.height, self.width, self.poison = num_images, height, width, poison

    def __len__(self):
        return self.count

    def read(self, indices):
        images = np.full((len(indices), self.height, self.width, 3), 0.5, np.float32)
        names = [self.names[i % len(self.names)] for i in indices]
        for row, name in enumerate(names):
            images[row, :, : self.width // 2] = COLORS[name]
        if self.poison:
            images[:] = np.nan
        return {
            "images": images,
            "prompt": [f"a {name} square" for name in names],
            "index": np.asarray(indices),
        }


register_image_dataset("test_colors")(ColorImages)
register_image_dataset("test_nan")(lambda **kw: ColorImages(poison=True, **kw))


def triplet_job(model: str, folder) -> dict:
    """The job config of 8 triplets from ``model`` as a rectified-flow teacher (2 Euler steps, no
    CFG) in ``folder/data``, with the prompts written to ``folder/prompts.txt``."""
    (folder / "prompts.txt").write_text("\n".join(f"{p} {i}" for i, p in enumerate(PROMPTS)))
    return {
        "teacher": {
            "model": model,
            "solver": "euler",
            "num_steps": 2,
            "guidance_scale": 1.0,
            "dtype": "float32",
        },
        "prompts": {"kind": "text", "path": str(folder / "prompts.txt")},
        "output_dir": str(folder / "data"),
        "height": 64,
        "width": 64,
        "shard_size": 4,
        "per_device_batch": 4,
        "latent_dtype": "float32",
    }


def config(tiny_pipeline_dir, **overrides):
    base = {
        "objective": "reflow",
        "init_from": tiny_pipeline_dir,
        "data": {"kind": "triplets", "path": "", "seed": 0},
        "height": 64,
        "width": 64,
        "batch_size": 8,
        "num_steps": 20,
        "ema_decay": 0.9,
        "prompt_dropout": 0.1,
        "dtype": "float32",
        "optimizer": {"learning_rate": 2e-3, "warmup_steps": 0, "weight_decay": 0.0, "clip_norm": 1.0},
        "log_every": 1,
        "checkpoint_every": 1000,  # > num_steps: only the final checkpoint
        "sample": {"every": 0},
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            base[key] = {**base.get(key, {}), **value}
        else:
            base[key] = value
    return base


def assert_learns(result, factor=0.8):
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert all(np.isfinite(losses)), losses
    assert np.mean(losses[-3:]) < factor * np.mean(losses[:2]), losses


def test_reflow_learns(tiny_pipeline_dir, scratch_unet_pipeline_dir, triplets, tmp_path):
    overrides = {"data": {"path": triplets}, "init_from": scratch_unet_pipeline_dir}
    result = train_and_evaluate(config(tiny_pipeline_dir, **overrides), str(tmp_path))
    assert_learns(result)
    assert {"loss", "grad_norm", "lr", "images_per_s", "step_time", "compile_s", "t_mean"} <= set(
        json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    )
    assert (tmp_path / "metrics.png").is_file() and (tmp_path / "export" / "model_index.json").is_file()


@pytest.mark.parametrize(
    "overrides",
    [
        # L2 to stored teacher targets; remat on (compiled with remat_compiler_options on CPU)
        {"objective": "distill", "prompt_dropout": 0.0, "remat": True},
        {
            "objective": "distill",
            "data": {"kind": "prompts", "prompts": {"kind": "text"}},
            "teacher": {"num_steps": 2, "guidance_scale": 1.5},
        },
        {
            "objective": "direct_distill",
            "data": {"kind": "prompts", "prompts": {"kind": "text"}},
            "teacher": {"solver": "dpmpp2m", "num_steps": 3, "guidance_scale": 2.0},
        },
    ],
    ids=["distill-stored-x1", "distill-online-2rf-teacher", "direct-distill-online-sd-teacher"],
)
def test_distillation_learns(tiny_pipeline_dir, scratch_unet_pipeline_dir, triplets, tmp_path, overrides):
    if "teacher" in overrides:
        overrides["teacher"]["model"] = tiny_pipeline_dir
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("\n".join(PROMPTS[:4]))
        overrides["data"]["prompts"]["path"] = str(prompts)
        overrides = {**overrides, "batch_size": 4}
    else:
        overrides = {**overrides, "data": {"path": triplets}}
    overrides["init_from"] = scratch_unet_pipeline_dir  # the student starts away from the teacher
    assert_learns(train_and_evaluate(config(tiny_pipeline_dir, **overrides), str(tmp_path / "run")))


def test_lpips_distillation_learns(tiny_pipeline_dir, scratch_unet_pipeline_dir, triplets, tmp_path):
    weights = write_random_lpips_weights(str(tmp_path / "lpips"))
    overrides = {"objective": "distill", "loss": "lpips", "lpips_weights_dir": weights, "lpips_resize": 32}
    overrides.update(init_from=scratch_unet_pipeline_dir, num_steps=10)
    result = train_and_evaluate(
        config(tiny_pipeline_dir, data={"path": triplets}, **overrides), str(tmp_path / "run")
    )
    assert_learns(result, factor=0.9)


def test_teacher_pretraining_learns(tiny_pipeline_dir, scratch_unet_pipeline_dir, tmp_path):
    overrides = {
        "objective": "teacher_pretrain",
        "init_from": scratch_unet_pipeline_dir,
        "num_steps": 30,
        "data": {"kind": "images", "images": "test_colors", "num_images": 8},
        "sample": {
            "every": 30,
            "num_steps": 5,
            "solver": "dpmpp2m",  # an ε-prediction UNet
            "guidance_scale": 2.0,
            "prompts": ["a red square", "a blue square"],
        },
    }
    result = train_and_evaluate(config(tiny_pipeline_dir, **overrides), str(tmp_path))
    assert_learns(result, factor=0.9)
    assert os.listdir(tmp_path / "samples") == ["step_0000030.png"]


def test_non_finite_loss_stops_with_a_clear_error(tiny_pipeline_dir, tmp_path):
    overrides = {
        "objective": "teacher_pretrain",
        "data": {"kind": "images", "images": "test_nan", "num_images": 8},
    }
    with pytest.raises(
        NonFiniteLossError,
        match=r"non-finite loss nan or gradient norm \S+ at step 1.*lower the learning rate",
    ):
        train_and_evaluate(config(tiny_pipeline_dir, num_steps=3, **overrides), str(tmp_path))


def test_gradient_accumulation_equals_the_full_batch(tiny_pipeline_dir, triplets, tmp_path):
    """With SGD (linear in the gradient) accumulated micro-batches give the full-batch update; the
    trainer with grad_accum=2 reports the full batch's loss and gradient norm."""
    import functools

    import optax

    from instaflow_jax.data.triplets import TripletDataset
    from instaflow_jax.text import tokenize
    from instaflow_jax.train.objectives import make_distill_loss
    from instaflow_jax.train.state import create_state, train_step
    from instaflow_jax.weights.pipeline_folder import load_pipeline_parts

    parts = load_pipeline_parts(tiny_pipeline_dir)
    frozen = {"text_encoder": parts.params["text_encoder"], "vae": parts.params["vae"]}
    frozen["uncond_ids"] = tokenize(parts.tokenizer, [""])
    data = TripletDataset(triplets).read(np.arange(8))
    batch = {"x0": data["x0"], "x1": data["x1"], "ids": tokenize(parts.tokenizer, data["prompt"])}
    loss_fn = make_distill_loss(parts.modules, prompt_dropout=0.0)
    sgd = optax.sgd(1.0)
    state = create_state(parts.params["unet"], sgd)
    step = functools.partial(
        train_step, loss_fn=loss_fn, optimizer=sgd, schedule=lambda _: 1.0, ema_decay=0.5, seed=0
    )
    full, full_metrics = jax.jit(functools.partial(step, grad_accum=1))(state, frozen, batch)
    accumulated, acc_metrics = jax.jit(functools.partial(step, grad_accum=4))(state, frozen, batch)
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(accumulated.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(float(acc_metrics[key]), float(full_metrics[key]), rtol=1e-5)

    base = config(
        tiny_pipeline_dir, objective="distill", prompt_dropout=0.0, data={"path": triplets}, num_steps=1
    )
    whole = train_and_evaluate(base, str(tmp_path / "full"))
    split = train_and_evaluate({**base, "grad_accum": 2}, str(tmp_path / "acc"))
    np.testing.assert_allclose(split.losses[1], whole.losses[1], rtol=1e-5)
    metrics = [
        json.loads((tmp_path / run / "metrics.jsonl").read_text())["grad_norm"] for run in ("full", "acc")
    ]
    np.testing.assert_allclose(metrics[1], metrics[0], rtol=1e-5)


def test_export_loads_in_pytorch_diffusers_with_the_same_velocity(tiny_pipeline_dir, triplets, tmp_path):
    from diffusers import UNet2DConditionModel

    import instaflow_jax

    result = train_and_evaluate(
        config(tiny_pipeline_dir, data={"path": triplets}, num_steps=3), str(tmp_path)
    )
    pipe = instaflow_jax.load_pipeline(result.export_dir)
    for a, b in zip(jax.tree.leaves(pipe.params["unet"]), jax.tree.leaves(result.state.ema_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the EMA weights were exported
    torch_unet = UNet2DConditionModel.from_pretrained(os.path.join(result.export_dir, "unet")).eval()
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    context = np.array(pipe.encode_prompt(["a photo of a cat", "a red circle"]))
    with torch.no_grad():
        ref = torch_unet(
            torch.from_numpy(z), torch.full((2,), 1000.0), torch.from_numpy(context)
        ).sample.numpy()
    ours = pipe.unet.apply({"params": pipe.params["unet"]}, z.transpose(0, 2, 3, 1), 1000.0, context)
    np.testing.assert_allclose(np.asarray(ours).transpose(0, 3, 1, 2), ref, atol=1e-4 * np.abs(ref).max())


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_training(cfg, workdir, out, devices, delay_s=0.0, env=None):
    """A training subprocess; ``delay_s`` makes it a slow host (it sleeps after loading models,
    i.e. after joining the distributed job and before its first collective)."""
    script = textwrap.dedent(
        f"""
        import time
        import numpy as np, jax
        from instaflow_jax.train import trainer
        from instaflow_jax.train.export import host_copy
        if {delay_s!r}:
            make_objective = trainer.make_objective
            def slow(*args, **kwargs):
                time.sleep({delay_s!r})
                return make_objective(*args, **kwargs)
            trainer.make_objective = slow
        result = trainer.train_and_evaluate({cfg!r}, {workdir!r})
        params = host_copy(result.state.params)
        if jax.process_index() == 0:
            np.savez({out!r}, *[np.asarray(x) for x in jax.tree.leaves(params)])
            print("losses", result.losses)
        """
    )
    env = dict(
        env or os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        PYTHONUNBUFFERED="1",
    )
    return subprocess.Popen(
        [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def root_error(output: str) -> str:
    """The first exception a child process raised (its traceback's last line), with the lines
    that name a runtime error (gloo, barriers), instead of the log's tail."""
    lines = output.splitlines()
    causes = [line for line in lines if re.match(r"^\s*[\w.]*(Error|Exception|Timeout)\b.*:", line)]
    runtime = [line for line in lines if "DEADLINE_EXCEEDED" in line or "barrier" in line.lower()]
    picked = list(dict.fromkeys(causes[:3] + runtime[:3]))
    return "\n".join(picked) if picked else output[-2000:]


def _finish(procs, timeout=900):
    failures = []
    for name, proc in procs:
        output, _ = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            failures.append(f"{name} exited {proc.returncode}: {root_error(output)}")
    assert not failures, "\n".join(failures)


def test_a_fresh_state_can_be_donated():
    """params and EMA must not share buffers, or donating the state donates one buffer twice."""
    import optax

    from instaflow_jax.train.state import create_state

    state = create_state({"w": np.ones((3,), np.float32)}, optax.sgd(0.1))
    bump = jax.jit(lambda s: s.replace(params=jax.tree.map(lambda p: p + 1, s.params)), donate_argnums=0)
    assert float(bump(state).ema_params["w"][0]) == 1.0
