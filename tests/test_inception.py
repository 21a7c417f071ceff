"""The FID Inception-v3 port against pytorch-fid's ``InceptionV3`` (block 3, resize and normalise on)
on the same random weights, saved in the official file's layout; the loader, safetensors conversion
and ``instaflow-convert-inception``.

pytorch-fid builds on torchvision's Inception blocks. Where torchvision cannot be imported (PyPI's
torchvision builds are CUDA builds, which fail to import beside the CPU torch of the test machines),
pytorch-fid is imported over a stand-in for the few torchvision classes it uses (below): the FID
blocks, the block order, the resize and the normalisation under test stay pytorch-fid's own.
"""

from __future__ import annotations

import importlib
import sys
import types
from unittest import mock

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pytorch_fid")

from instaflow_jax.cli import convert_inception  # noqa: E402
from instaflow_jax.models.inception import FEATURES, inception_features, resize_bilinear  # noqa: E402
from instaflow_jax.weights.inception import (  # noqa: E402
    InceptionWeightsError,
    load_fid_inception_params,
)

SHAPES = [(2, 299, 299), (1, 64, 64), (1, 320, 256)]  # [B, H, W]: 299², upsampling, downsampling
TOLERANCE = 1e-4


def torchvision_stand_in() -> dict[str, types.ModuleType]:
    """torchvision 0.28's ``BasicConv2d``, ``InceptionA..E`` and ``Inception3`` (aux_logits=False) as
    pytorch-fid 0.3.0 uses them: the same submodule names, shapes and unpatched forward passes."""
    nn, F = torch.nn, torch.nn.functional

    class BasicConv2d(nn.Module):
        def __init__(self, cin, cout, **kwargs):
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
            self.bn = nn.BatchNorm2d(cout, eps=0.001)

        def forward(self, x):
            return F.relu(self.bn(self.conv(x)))

    class InceptionA(nn.Module):
        def __init__(self, cin, pool_features):
            super().__init__()
            self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
            self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
            self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
            self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
            self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
            self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
            self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    class InceptionB(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
            self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
            self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
            self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

        def forward(self, x):
            b3 = self.branch3x3(x)
            bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return torch.cat([b3, bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)

    class InceptionC(nn.Module):
        def __init__(self, cin, channels_7x7):
            super().__init__()
            c7, row, col = (
                channels_7x7,
                dict(kernel_size=(1, 7), padding=(0, 3)),
                dict(kernel_size=(7, 1), padding=(3, 0)),
            )
            self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
            self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
            self.branch7x7_2 = BasicConv2d(c7, c7, **row)
            self.branch7x7_3 = BasicConv2d(c7, 192, **col)
            self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
            self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col)
            self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row)
            self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col)
            self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row)
            self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    class InceptionD(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
            self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
            self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
            self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

        def forward(self, x):
            b3 = self.branch3x3_2(self.branch3x3_1(x))
            b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
            return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)

    class InceptionE(nn.Module):
        def __init__(self, cin):
            super().__init__()
            row, col = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))
            self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
            self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
            self.branch3x3_2a = BasicConv2d(384, 384, **row)
            self.branch3x3_2b = BasicConv2d(384, 384, **col)
            self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
            self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
            self.branch3x3dbl_3a = BasicConv2d(384, 384, **row)
            self.branch3x3dbl_3b = BasicConv2d(384, 384, **col)
            self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    class Inception3(nn.Module):
        def __init__(self, num_classes=1000, aux_logits=True, init_weights=None, **_):
            super().__init__()
            assert not aux_logits, "pytorch-fid builds it without the aux classifier"
            self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
            self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
            self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
            self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
            self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
            self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
            self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
            self.Mixed_5b = InceptionA(192, pool_features=32)
            self.Mixed_5c = InceptionA(256, pool_features=64)
            self.Mixed_5d = InceptionA(288, pool_features=64)
            self.Mixed_6a = InceptionB(288)
            self.Mixed_6b = InceptionC(768, channels_7x7=128)
            self.Mixed_6c = InceptionC(768, channels_7x7=160)
            self.Mixed_6d = InceptionC(768, channels_7x7=160)
            self.Mixed_6e = InceptionC(768, channels_7x7=192)
            self.Mixed_7a = InceptionD(768)
            self.Mixed_7b = InceptionE(1280)
            self.Mixed_7c = InceptionE(2048)
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.dropout = nn.Dropout(p=0.5)
            self.fc = nn.Linear(2048, num_classes)

    inception = types.ModuleType("torchvision.models.inception")
    for cls in (BasicConv2d, InceptionA, InceptionB, InceptionC, InceptionD, InceptionE, Inception3):
        setattr(inception, cls.__name__, cls)
    models = types.ModuleType("torchvision.models")
    models.inception = inception
    models.inception_v3 = lambda weights=None, **kwargs: Inception3(**kwargs)
    package = types.ModuleType("torchvision")
    package.__version__, package.models = "0.28.0", models
    return {"torchvision": package, "torchvision.models": models, "torchvision.models.inception": inception}


def import_pytorch_fid() -> types.ModuleType:
    """``pytorch_fid.inception`` over the real torchvision where it imports, else over the stand-in
    (only while importing: ``sys.modules`` is left as it was)."""
    try:
        import torchvision  # noqa: F401

        return importlib.import_module("pytorch_fid.inception")
    except (ImportError, RuntimeError):  # RuntimeError: "operator torchvision::nms does not exist"
        pass
    with mock.patch.dict(sys.modules):  # restored on exit
        for name in [n for n in sys.modules if n.split(".")[0] in ("torchvision", "pytorch_fid")]:
            del sys.modules[name]  # a half-imported torchvision
        sys.modules.update(torchvision_stand_in())
        return importlib.import_module("pytorch_fid.inception")


def random_state_dict(pfi: types.ModuleType, seed: int = 0) -> dict:
    """A random state dict in the official file's layout (torchvision's ``Inception3`` with the FID
    blocks, fc included): He-scaled convs, and BatchNorm affine and running stats all random."""
    model = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    for name, cin, pool_features in [("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)]:
        setattr(model, name, pfi.FIDInceptionA(cin, pool_features=pool_features))
    for name, c7 in [("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)]:
        setattr(model, name, pfi.FIDInceptionC(768, channels_7x7=c7))
    model.Mixed_7b, model.Mixed_7c = pfi.FIDInceptionE_1(1280), pfi.FIDInceptionE_2(2048)
    g = torch.Generator().manual_seed(seed)
    rand = lambda shape, lo, hi: lo + (hi - lo) * torch.rand(shape, generator=g)
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith("conv.weight"):
            state[key] = torch.randn(value.shape, generator=g) * (1.5 / value[0].numel()) ** 0.5
        elif key.endswith(("bn.weight", "running_var")):
            state[key] = rand(value.shape, 0.5, 1.5)
        elif key.endswith(("bn.bias", "running_mean")):
            state[key] = 0.2 * torch.randn(value.shape, generator=g)
        elif value.is_floating_point():  # fc
            state[key] = 0.01 * torch.randn(value.shape, generator=g)
        else:  # num_batches_tracked
            state[key] = value
    return state


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(pytorch-fid's InceptionV3 on random weights, the weights' .pth path)."""
    pfi = import_pytorch_fid()
    state = random_state_dict(pfi)
    path = tmp_path_factory.mktemp("fid") / "pt_inception-random.pth"
    torch.save(state, path)
    with mock.patch.object(pfi, "load_state_dict_from_url", lambda *args, **kwargs: state):
        model = pfi.InceptionV3([3], resize_input=True, normalize_input=True).eval()
    return model, path


@pytest.fixture(scope="module")
def params(reference):
    return load_fid_inception_params(reference[1])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_features_match_pytorch_fid(reference, params, shape):
    images = np.random.default_rng(sum(shape)).random((*shape, 3), dtype=np.float32)
    with torch.no_grad():
        (expected,) = reference[0](torch.from_numpy(images).permute(0, 3, 1, 2))
    expected = expected[:, :, 0, 0].numpy()
    got = np.asarray(jax.jit(inception_features)(params, images))
    assert got.shape == (shape[0], FEATURES) and got.dtype == np.float32
    assert np.abs(expected).mean() > 0.1  # not a dead network
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("size", [(299, 299), (40, 90), (512, 384)])
def test_resize_matches_interpolate(size):
    images = np.random.default_rng(0).random((2, 61, 77, 3), dtype=np.float32)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(images).permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False
    )
    got = np.asarray(resize_bilinear(images, size))
    np.testing.assert_allclose(got, expected.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-6)


def test_safetensors_round_trip_and_cli(reference, params, tmp_path, capsys):
    pth, dst = reference[1], tmp_path / "fid.safetensors"
    assert convert_inception.main([str(pth), str(dst)]) == 0
    assert "wrote" in capsys.readouterr().out
    converted = load_fid_inception_params(dst)
    assert jax.tree.structure(converted) == jax.tree.structure(params)
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, converted, params)))
    with mock.patch.dict(sys.modules, {"torch": None}):  # a host without torch: safetensors only
        load_fid_inception_params(dst)
        with pytest.raises(ValueError, match="instaflow-convert-inception"):
            load_fid_inception_params(pth)


def test_cli_errors(tmp_path, capsys):
    assert convert_inception.main([str(tmp_path / "missing.pth"), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "pt_inception-2015-12-05-6726825d.pth" in err
    assert not (tmp_path / "out.safetensors").exists()


def test_wrong_keys_and_shapes(reference, tmp_path):
    state = torch.load(reference[1], weights_only=True)
    del state["Mixed_6e.branch_pool.bn.running_var"]
    state["Mixed_8a.conv.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "keys.pth")
    with pytest.raises(InceptionWeightsError, match=r"Mixed_6e\.branch_pool\.bn\.running_var.*Mixed_8a"):
        load_fid_inception_params(tmp_path / "keys.pth")
    state = torch.load(reference[1], weights_only=True)
    state["Mixed_7c.branch1x1.conv.weight"] = torch.zeros(320, 2048, 3, 3)
    torch.save(state, tmp_path / "shapes.pth")
    with pytest.raises(InceptionWeightsError, match=r"Mixed_7c\.branch1x1\.conv\.weight has shape"):
        load_fid_inception_params(tmp_path / "shapes.pth")
