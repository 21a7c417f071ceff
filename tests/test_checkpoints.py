"""Checkpoints, preemption and settings: exact restarts, damaged checkpoints fall back, SIGTERM
saves and resumes bit for bit, bad settings are refused before any work."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from test_training import config, root_error

from instaflow_jax.train.trainer import train_and_evaluate


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


def test_fingerprints_on_host_equal_the_device_program():
    """The numpy path (arrays already in host memory) gives the jitted program's digits."""
    from instaflow_jax.train.checkpoint import _fingerprints, tree_fingerprint

    rng = np.random.default_rng(1)
    tree = {
        "f32": rng.standard_normal((5, 77)).astype(np.float32),
        "bf16": jax.numpy.asarray(rng.standard_normal((9,)), jax.numpy.bfloat16),
        "i32": np.int32(-7),
        "u8": rng.integers(0, 255, (13,), dtype=np.uint8),
        "flag": np.array([True, False, True]),
        "key": jax.random.key(3),
    }
    device = {
        jax.tree_util.keystr(path): "".join(f"{int(v):08x}" for v in np.asarray(value))
        for path, value in jax.tree_util.tree_flatten_with_path(_fingerprints(tree))[0]
    }
    assert tree_fingerprint(tree) == device


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
