"""Shared fixtures: one tiny pipeline per session, torch reference models, tolerance helpers."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
# Compilations persist across test processes (the multi-device subprocess) but not in $HOME.
os.environ.setdefault(
    "INSTAFLOW_JAX_COMPILATION_CACHE",
    os.path.join(tempfile.gettempdir(), f"instaflow_jax_test_cache_{os.getuid()}"),
)

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


def perturb_torch_(model, seed: int, scale: float = 0.05):
    """In place: add scale·N(0,1) to every parameter so norms/biases are not trivially 1/0."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model.eval()
