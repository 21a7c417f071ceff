"""LPIPS through lpips-j with local weights: closed-form properties and an independent PyTorch
implementation of the LPIPS formula on the same random weights."""

from __future__ import annotations

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from instaflow_jax.testing import VGG16_BLOCKS, write_random_lpips_weights
from instaflow_jax.train.lpips import lpips_distance, make_lpips, resolve_weights


@pytest.fixture(scope="module")
def lpips(tmp_path_factory):
    folder = write_random_lpips_weights(str(tmp_path_factory.mktemp("lpips")))
    module, params = make_lpips(folder, image_size=32)
    return folder, module, params


def _images(seed, n=2, size=32):
    return jax.random.uniform(jax.random.key(seed), (n, size, size, 3), minval=-1.0, maxval=1.0)


def test_identity_is_zero_and_gradients_flow(lpips):
    _, module, params = lpips
    x, y = _images(0), _images(1)
    np.testing.assert_allclose(lpips_distance(module, params, x, x), 0.0, atol=1e-7)
    d = lpips_distance(module, params, x, y)
    assert d.shape == (2,) and bool(jnp.all(d > 0))
    grad = jax.grad(lambda a: lpips_distance(module, params, a, y).sum())(x)
    assert bool(jnp.isfinite(grad).all()) and float(jnp.abs(grad).max()) > 0


def _torch_lpips(folder, x, y):
    """LPIPS (Zhang et al.) written directly in PyTorch: VGG16 features after each block's last
    ReLU, unit-normalised over channels, squared difference, 1×1 linear weights, spatial mean."""
    vgg = h5py.File(f"{folder}/vgg16_weights.h5", "r")
    lin = h5py.File(f"{folder}/lpips_lin.h5", "r")
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def features(images):
        h = (torch.from_numpy(np.array(images)).permute(0, 3, 1, 2) + 1) / 2
        h = (h - mean) / std
        out = []
        for block, (_, layers) in enumerate(VGG16_BLOCKS, 1):
            if block > 1:
                h = torch.nn.functional.max_pool2d(h, 2)
            for layer in range(1, layers + 1):
                w = torch.from_numpy(vgg[f"conv{block}_{layer}"]["weight"][()]).permute(3, 2, 0, 1)
                b = torch.from_numpy(vgg[f"conv{block}_{layer}"]["bias"][()])
                h = torch.relu(torch.nn.functional.conv2d(h, w, b, padding=1))
            out.append(h)
        return out

    total = 0
    for i, (fx, fy) in enumerate(zip(features(x), features(y))):
        nx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        ny = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        w = torch.from_numpy(lin[f"lin{i}"][()]).permute(3, 2, 0, 1)
        total = total + torch.nn.functional.conv2d((nx - ny) ** 2, w).mean(dim=(2, 3))
    return total.view(-1).numpy()


def test_matches_an_independent_pytorch_lpips(lpips):
    folder, module, params = lpips
    x, y = _images(2), _images(3)
    ours = np.asarray(lpips_distance(module, params, x, y))
    np.testing.assert_allclose(ours, _torch_lpips(folder, x, y), rtol=1e-4)


def test_missing_weights_are_named_and_never_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(FileNotFoundError, match=r"vgg16_weights.h5.*lpips_lin.h5.*hf download"):
        resolve_weights(str(tmp_path))
    write_random_lpips_weights(str(tmp_path / "w"))
    (tmp_path / "w" / "lpips_lin.h5").unlink()
    with pytest.raises(FileNotFoundError, match=r"\['lpips_lin.h5'\]"):
        resolve_weights(str(tmp_path / "w"))


def test_weights_from_the_hugging_face_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snapshot = cache / "models--pcuenq--lpips-jax" / "snapshots" / ("a" * 40)
    write_random_lpips_weights(str(snapshot))
    (cache / "models--pcuenq--lpips-jax" / "refs").mkdir()
    (cache / "models--pcuenq--lpips-jax" / "refs" / "main").write_text("a" * 40)
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    paths = resolve_weights(None)
    assert paths["vgg16_weights.h5"].startswith(str(snapshot))
