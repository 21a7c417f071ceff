"""Shared fixtures: one tiny pipeline per session, torch reference models, tolerance helpers."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
# Compilations persist across test processes (the multi-device subprocess) but not in $HOME.
os.environ.setdefault(
    "INSTAFLOW_JAX_COMPILATION_CACHE",
    os.path.join(tempfile.gettempdir(), f"instaflow_jax_test_cache_{os.getuid()}"),
)

# PyTorch references run single-threaded: its OpenMP workers spin against XLA's own thread pool
# in the same process (measured: a 25-step tiny torch pipeline 39 s with 2 threads, 1.6 s with 1).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def assert_close(ours, ref, rel: float = 1e-4, what: str = "") -> None:
    """max |ours − ref| ≤ rel · max |ref| (the issue's 'error relative to the output's scale')."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs reference {ref.shape}"
    scale = float(np.abs(ref).max())
    err = float(np.abs(ours - ref).max())
    assert scale > 0, f"{what}: reference is all zeros, the comparison would be vacuous"
    assert err <= rel * scale, f"{what}: max abs error {err:.3g} > {rel:g} × scale {scale:.3g}"


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> str:
    """A random tiny SD 1.x-layout pipeline written by ``make_tiny_pipeline`` (once per session)."""
    from instaflow_jax.testing import make_tiny_pipeline

    return make_tiny_pipeline(str(tmp_path_factory.mktemp("tiny") / "pipe"), seed=0)


@pytest.fixture(scope="session")
def scratch_unet_pipeline_dir(tiny_pipeline_dir, tmp_path_factory) -> str:
    """The tiny pipeline with its UNet re-initialised by Flax (``unet.init``, key 0), text
    encoder, VAE and tokenizer shared: a student that starts away from the tiny pipeline as teacher."""
    import jax
    import jax.numpy as jnp

    from instaflow_jax.examples.toy.starts import write_with_unet
    from instaflow_jax.weights.pipeline_folder import load_pipeline_parts

    unet = load_pipeline_parts(tiny_pipeline_dir).modules["unet"]
    dummy = (
        jnp.zeros((1, 8, 8, unet.config.in_channels)),
        jnp.ones((1,)),
        jnp.zeros((1, 1, unet.config.cross_attention_dim)),
    )
    params = jax.tree.map(np.asarray, jax.jit(unet.init)(jax.random.key(0), *dummy)["params"])
    folder = str(tmp_path_factory.mktemp("scratch_unet") / "pipe")
    return write_with_unet(tiny_pipeline_dir, folder, lambda _: params)


@pytest.fixture(scope="module")
def triplets(tiny_pipeline_dir, tmp_path_factory) -> str:
    """8 triplets from the tiny pipeline as a rectified-flow teacher (2 Euler steps, no CFG): the
    training tests' data (``test_training.triplet_job``)."""
    from test_training import triplet_job

    from instaflow_jax.generate_triplets import generate_triplets

    return str(generate_triplets(triplet_job(tiny_pipeline_dir, tmp_path_factory.mktemp("triplets"))))


@pytest.fixture(scope="session")
def tiny_toy_run(tmp_path_factory) -> tuple[str, dict]:
    """The ``tiny`` small-scale reproduction, run once per session: (workdir, stage summaries)."""
    from instaflow_jax.examples import toy
    from instaflow_jax.examples.toy.config import get_config

    workdir = str(tmp_path_factory.mktemp("toy") / "run")
    return workdir, toy.run_toy(get_config("tiny"), workdir)


@contextlib.contextmanager
def _cpu_share(exclusive: bool):
    """Under pytest-xdist (``-n 2``) an ``exclusive_cpu`` test runs while no other worker runs a
    test: it raises a flag (no new test starts) and takes an exclusive lock (running tests end
    first); every other test holds a shared lock. Without xdist this does nothing."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if not run:
        yield
        return
    base = os.path.join(tempfile.gettempdir(), f"instaflow_jax_tests_{run}")
    with open(base + ".lock", "a") as lock:
        if exclusive:
            open(base + ".wanted", "a").close()
        else:
            while os.path.exists(base + ".wanted"):
                time.sleep(0.5)
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            if exclusive:
                os.remove(base + ".wanted")
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    # The whole protocol (fixture set-up included: module fixtures train models too).
    with _cpu_share(item.get_closest_marker("exclusive_cpu") is not None):
        yield


def perturb_torch_(model, seed: int, scale: float = 0.05):
    """In place: add scale·N(0,1) to every parameter so norms/biases are not trivially 1/0."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model.eval()
