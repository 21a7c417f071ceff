"""Training: every objective learns, restarts are exact, multi-process equals single-process,
FSDP and gradient accumulation change nothing, exports load in PyTorch diffusers."""

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
from instaflow_jax.generate_triplets import generate_triplets
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


@pytest.fixture(scope="module")
def triplets(tiny_pipeline_dir, tmp_path_factory):
    """8 triplets from the tiny pipeline as a rectified-flow teacher (2 Euler steps, no CFG)."""
    folder = tmp_path_factory.mktemp("triplets")
    (folder / "prompts.txt").write_text("\n".join(f"{p} {i}" for i, p in enumerate(PROMPTS)))
    config = {
        "teacher": {
            "model": tiny_pipeline_dir,
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
    return str(generate_triplets(config))


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


def test_reflow_learns(tiny_pipeline_dir, triplets, tmp_path):
    overrides = {"data": {"path": triplets}, "init_unet_from_scratch": True}
    result = train_and_evaluate(config(tiny_pipeline_dir, **overrides), str(tmp_path))
    assert_learns(result)
    assert {"loss", "grad_norm", "lr", "images_per_s", "step_time", "compile_time", "t_mean"} <= set(
        json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    )
    assert (tmp_path / "metrics.png").is_file() and (tmp_path / "export" / "model_index.json").is_file()


@pytest.mark.parametrize(
    "overrides",
    [
        {"objective": "distill", "prompt_dropout": 0.0},  # L2 to stored teacher targets
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
def test_distillation_learns(tiny_pipeline_dir, triplets, tmp_path, overrides):
    if "teacher" in overrides:
        overrides["teacher"]["model"] = tiny_pipeline_dir
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("\n".join(PROMPTS[:4]))
        overrides["data"]["prompts"]["path"] = str(prompts)
        overrides = {**overrides, "batch_size": 4}
    else:
        overrides = {**overrides, "data": {"path": triplets}}
    overrides["init_unet_from_scratch"] = True  # the student starts away from the teacher
    assert_learns(train_and_evaluate(config(tiny_pipeline_dir, **overrides), str(tmp_path / "run")))


def test_lpips_distillation_learns(tiny_pipeline_dir, triplets, tmp_path):
    weights = write_random_lpips_weights(str(tmp_path / "lpips"))
    overrides = {"objective": "distill", "loss": "lpips", "lpips_weights_dir": weights, "lpips_resize": 32}
    overrides.update(init_unet_from_scratch=True, num_steps=10)
    result = train_and_evaluate(
        config(tiny_pipeline_dir, data={"path": triplets}, **overrides), str(tmp_path / "run")
    )
    assert_learns(result, factor=0.9)


def test_teacher_pretraining_learns(tiny_pipeline_dir, tmp_path):
    overrides = {
        "objective": "teacher_pretrain",
        "init_unet_from_scratch": True,
        "num_steps": 30,
        "data": {"kind": "images", "images": "test_colors", "num_images": 8},
        "sample": {
            "every": 30,
            "num_steps": 5,
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


def test_restart_continues_exactly(tiny_pipeline_dir, triplets, tmp_path):
    """Losses (with random t and prompt dropout) and parameters after a restart equal those of an
    uninterrupted run."""
    whole = train_and_evaluate(
        config(tiny_pipeline_dir, data={"path": triplets}, num_steps=6), str(tmp_path / "a")
    )
    part = config(tiny_pipeline_dir, data={"path": triplets}, num_steps=3, checkpoint_every=3)
    first = train_and_evaluate(part, str(tmp_path / "b"))
    resumed = train_and_evaluate({**part, "num_steps": 6}, str(tmp_path / "b"))
    assert sorted(first.losses) == [1, 2, 3] and sorted(resumed.losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed.losses[step] == whole.losses[step], step
    for a, b in zip(jax.tree.leaves(resumed.state.params), jax.tree.leaves(whole.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    lines = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert lines == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match=r"another config: optimizer"):
        train_and_evaluate(
            {**part, "num_steps": 7, "optimizer": {**part["optimizer"], "learning_rate": 1.0}},
            str(tmp_path / "b"),
        )


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
    frozen = {"text_encoder": parts["params"]["text_encoder"], "vae": parts["params"]["vae"]}
    frozen["uncond_ids"] = tokenize(parts["tokenizer"], [""])
    data = TripletDataset(triplets).read(np.arange(8))
    batch = {"x0": data["x0"], "x1": data["x1"], "ids": tokenize(parts["tokenizer"], data["prompt"])}
    loss_fn = make_distill_loss(parts["modules"], prompt_dropout=0.0)
    sgd = optax.sgd(1.0)
    state = create_state(parts["params"]["unet"], sgd)
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


def test_two_fsdp_processes_equal_one_process(tiny_pipeline_dir, triplets, tmp_path):
    """2 processes × 2 devices with FSDP-sharded parameters and optimizer state train like one
    process on one device, with one of the two processes reaching its first collective 35 s late
    (CPU collectives give up after 30 s without the start-up barriers)."""
    # Adam's eps at 1e-4 keeps m/√v from magnifying last-bit differences of near-zero gradients.
    adam = {"eps": 1e-4}
    base = config(tiny_pipeline_dir, data={"path": triplets}, num_steps=3, batch_size=8, optimizer=adam)
    single = train_and_evaluate(base, str(tmp_path / "one"))
    from instaflow_jax.train.export import host_copy

    np.savez(tmp_path / "one.npz", *[np.asarray(x) for x in jax.tree.leaves(host_copy(single.state.params))])
    # The distributed pair runs alone: no third process competes for the two cores.
    port = _free_port()
    pair = []
    for pid in (0, 1):
        distributed = {
            "enabled": True,
            "coordinator_address": f"127.0.0.1:{port}",
            "num_processes": 2,
            "process_id": pid,
            "barrier_timeout_s": 300,
        }
        cfg = {**base, "fsdp": True, "distributed": distributed}
        proc = _run_training(cfg, str(tmp_path / "two"), str(tmp_path / "two.npz"), 2, delay_s=35.0 * pid)
        pair.append((f"process {pid} of 2", proc))
    _finish(pair)
    one, two = (np.load(tmp_path / f"{n}.npz") for n in ("one", "two"))
    assert len(one.files) == len(two.files) > 0
    initial = [
        np.asarray(x)
        for x in jax.tree.leaves(__import__("instaflow_jax").load_pipeline(tiny_pipeline_dir).params["unet"])
    ]
    assert any(
        np.abs(one[k] - init).max() > 0 for k, init in zip(one.files, initial)
    )  # training moved the weights
    # One device and 2 × 2 devices sum gradients in different orders; Adam's m/√v turns those
    # last-bit differences into ≲ 1e-5 (a wrong shard or step would differ by ~lr = 2e-3).
    for key in one.files:
        np.testing.assert_allclose(two[key], one[key], rtol=1e-5, atol=3e-5)


def test_a_fresh_state_can_be_donated():
    """params and EMA must not share buffers, or donating the state donates one buffer twice."""
    import optax

    from instaflow_jax.train.state import create_state

    state = create_state({"w": np.ones((3,), np.float32)}, optax.sgd(0.1))
    bump = jax.jit(lambda s: s.replace(params=jax.tree.map(lambda p: p + 1, s.params)), donate_argnums=0)
    assert float(bump(state).ema_params["w"][0]) == 1.0


def test_init_output_sign_negates_only_the_output_layer(tiny_pipeline_dir, triplets, tmp_path):
    import instaflow_jax

    # lr must be > 0: 1e-30 moves no weight by more than 1e-29 (frozen for this comparison).
    frozen_lr = {"learning_rate": 1e-30, "warmup_steps": 0, "weight_decay": 0.0, "clip_norm": 1.0}
    cfg = config(
        tiny_pipeline_dir, data={"path": triplets}, num_steps=1, init_output_sign=-1, optimizer=frozen_lr
    )
    result = train_and_evaluate(cfg, str(tmp_path))
    before = instaflow_jax.load_pipeline(tiny_pipeline_dir).params["unet"]
    after = instaflow_jax.load_pipeline(result.export_dir).params["unet"]
    for name in ("kernel", "bias"):
        np.testing.assert_allclose(
            np.asarray(after["conv_out"][name]), -np.asarray(before["conv_out"][name]), rtol=0, atol=1e-12
        )
    np.testing.assert_allclose(
        np.asarray(after["conv_in"]["kernel"]), np.asarray(before["conv_in"]["kernel"]), rtol=0, atol=1e-12
    )
    with pytest.raises(ValueError, match="init_output_sign must be 1 or -1"):
        train_and_evaluate({**cfg, "init_output_sign": 2}, str(tmp_path / "bad"))


# ------------------------------------------------ reliability: checkpoints, preemption, settings


@pytest.fixture(scope="module")
def six_steps(tiny_pipeline_dir, triplets, tmp_path_factory):
    """An uninterrupted 6-step run (the reference) and a 4-step run with checkpoints at 2 and 4."""
    root = tmp_path_factory.mktemp("ckpt")
    whole = train_and_evaluate(
        config(tiny_pipeline_dir, data={"path": triplets}, num_steps=6), str(root / "whole")
    )
    part = config(tiny_pipeline_dir, data={"path": triplets}, num_steps=4, checkpoint_every=2)
    train_and_evaluate(part, str(root / "part"))
    return whole, part, root / "part"


def _damage(step_dir, how):
    files = sorted((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    state_files = [p for p in files if "state" in p.relative_to(step_dir).parts]
    if how == "flip":  # eight bytes in the middle of the largest data file
        target = state_files[-1]
        data = bytearray(target.read_bytes())
        middle = len(data) // 2
        data[middle : middle + 8] = bytes(255 - b for b in data[middle : middle + 8])
        target.write_bytes(bytes(data))
    elif how == "truncate":
        target = state_files[-1]
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 3])
    elif how == "delete_state":
        import shutil

        shutil.rmtree(step_dir / "state")
    elif how == "bad_metadata":
        (step_dir / "meta" / "metadata").write_text('{"config": ')


@pytest.mark.parametrize("how", ["flip", "truncate", "delete_state", "bad_metadata"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_good_one(six_steps, tmp_path, capfd, how):
    import shutil

    whole, part, done = six_steps
    workdir = tmp_path / "run"
    shutil.copytree(done, workdir)
    _damage(workdir / "checkpoints" / "4", how)
    capfd.readouterr()
    resumed = train_and_evaluate({**part, "num_steps": 6}, str(workdir))
    err = capfd.readouterr().err
    assert re.search(
        r"warning: checkpoint step 4 is damaged \(.+\); moved to .+; falling back to step 2", err
    ), err
    if how == "flip":
        assert "fingerprint" in err, err  # caught by the arrays' checksums, not by a decoder
    assert sorted(resumed.losses) == [3, 4, 5, 6]
    for step in (3, 4, 5, 6):
        assert resumed.losses[step] == whole.losses[step], step
    for a, b in zip(jax.tree.leaves(resumed.state.ema_params), jax.tree.leaves(whole.state.ema_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [p.name.split("-")[0] for p in (workdir / "checkpoints.damaged").iterdir()] == ["4"]


def test_when_every_checkpoint_is_damaged_the_error_says_what_to_do(six_steps, tmp_path):
    import shutil

    from instaflow_jax.train.checkpoint import CheckpointError

    _, part, done = six_steps
    workdir = tmp_path / "run"
    shutil.copytree(done, workdir)
    for step in ("2", "4"):
        _damage(workdir / "checkpoints" / step, "delete_state")
    with pytest.raises(
        CheckpointError, match=r"every checkpoint in .* was damaged \(steps \[2, 4\]\).*start from scratch"
    ):
        train_and_evaluate({**part, "num_steps": 6}, str(workdir))


def test_fingerprints_see_any_single_change_and_ignore_sharding():
    from jax.sharding import NamedSharding, PartitionSpec

    from instaflow_jax.parallel import make_mesh
    from instaflow_jax.train.checkpoint import tree_fingerprint

    rng = np.random.default_rng(0)
    tree = {
        "w": rng.standard_normal((64, 33)).astype(np.float32),
        "b": rng.standard_normal((7,)).astype(jnp_bf16()),
        "count": np.int32(5),
    }
    base = tree_fingerprint(tree)
    for key, index in (("w", (3, 7)), ("w", (63, 32)), ("b", (0,))):
        changed = {k: np.array(v, copy=True) for k, v in tree.items()}
        flat = changed[key].view(np.uint16 if changed[key].dtype.itemsize == 2 else np.uint32)
        flat[index] ^= 1  # one flipped bit
        assert tree_fingerprint(changed)[f"['{key}']"] != base[f"['{key}']"], (key, index)
    swapped = {**tree, "w": tree["w"][::-1].copy()}  # same values, other positions
    assert tree_fingerprint(swapped)["['w']"] != base["['w']"]
    mesh = make_mesh(jax.devices())
    sharded = {**tree, "w": jax.device_put(tree["w"], NamedSharding(mesh, PartitionSpec()))}
    assert tree_fingerprint(sharded) == base


def jnp_bf16():
    import ml_dtypes

    return ml_dtypes.bfloat16


def test_sigterm_saves_at_the_next_step_and_resume_equals_an_uninterrupted_run(
    tiny_pipeline_dir, triplets, tmp_path
):
    import signal
    import time

    cfg = config(tiny_pipeline_dir, data={"path": triplets}, num_steps=100_000, checkpoint_every=50_000)
    workdir = tmp_path / "preempted"
    script = textwrap.dedent(
        f"""
        from instaflow_jax.train.trainer import train_and_evaluate
        result = train_and_evaluate({cfg!r}, {str(workdir)!r})
        print("preempted", result.preempted, "step", result.step)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, root_error(output)
    stopped = int(re.search(r"preempted True step (\d+)", output).group(1))
    assert 2 <= stopped < 100_000
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [stopped]
    total = stopped + 2
    resumed = train_and_evaluate({**cfg, "num_steps": total}, str(workdir))
    whole = train_and_evaluate({**cfg, "num_steps": total}, str(tmp_path / "whole"))
    assert sorted(resumed.losses) == [stopped + 1, total]
    for step in resumed.losses:
        assert resumed.losses[step] == whole.losses[step]
    for a, b in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(whole.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    "override, message",
    [
        ({"log_every": 0}, "log_every 0 (expected ≥ 1)"),
        ({"num_steps": 0}, "num_steps 0 (expected ≥ 1)"),
        ({"num_steps": -3}, "num_steps -3"),
        ({"ema_decay": 2.0}, "ema_decay 2.0 (expected in [0, 1))"),
        ({"optimizer": {"learning_rate": -1.0}}, "optimizer.learning_rate -1.0 (expected > 0)"),
        ({"keep_checkpoints": 0}, "keep_checkpoints 0"),
        ({"checkpoint_every": 0}, "checkpoint_every 0"),
        ({"seed": 2**32}, "seed 4294967296 (expected in 0…4294967295)"),
        ({"sample": {"guidance_scale": float("inf")}}, "sample.guidance_scale inf"),
        ({"height": 60}, "height 60 (expected a positive multiple of 8)"),
    ],
)
def test_out_of_range_settings_are_refused_before_any_work(tiny_pipeline_dir, override, message):
    from instaflow_jax.train.config import TrainConfig

    with pytest.raises(ValueError, match="invalid training config: .*" + re.escape(message)):
        TrainConfig.from_config(config(tiny_pipeline_dir, **override))


def test_the_training_command_turns_bad_settings_into_one_error_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cases = [
        (["--config.log_every=0"], str(tmp_path / "run"), "log_every 0 (expected ≥ 1)"),
        ([], str(blocker / "run"), "the run folder (--workdir)"),
    ]
    for extra, workdir, message in cases:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "instaflow_jax.train",
                "--config",
                "configs/reflow_sd15.py:tiny",
                "--workdir",
                workdir,
                *extra,
            ],
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            env=dict(os.environ, JAX_PLATFORMS="cpu"),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and message in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1].startswith("error: ")


def test_a_metrics_log_cut_by_a_kill_resumes_cleanly(tmp_path):
    from instaflow_jax.train.metrics import MetricsWriter, read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    writer = MetricsWriter(str(tmp_path), resume_step=2)
    writer.write(3, {"loss": 0.3})
    assert read_metrics(str(path)) == [
        {"step": 1, "loss": 0.5},
        {"step": 2, "loss": 0.4},
        {"step": 3, "loss": 0.3},
    ]
    path.write_text('{"step": 1, "lo\n{"step": 2, "loss": 0.4}\n')
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        read_metrics(str(path))
