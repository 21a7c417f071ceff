"""The FID Inception weights: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (a state dict of
torchvision's ``Inception3`` with the FID blocks), read from a local path without running pickled
code, or its one-time safetensors conversion (same keys, float32), read without torch.

``fc.*`` (the 1008-way classifier), ``AuxLogits.*`` and ``*.num_batches_tracked`` are not used.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from flax import traverse_util

from instaflow_jax.models.inception import abstract_params
from instaflow_jax.weights import safetensors_io
from instaflow_jax.weights.convert import WeightsMismatchError

FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
CONVERT_HINT = (
    "convert it once with `instaflow-convert-inception SRC.pth DST.safetensors` on a host with torch, "
    "then pass the .safetensors"
)
UNUSED = ("fc.", "AuxLogits.")  # the classifier heads: not part of the pool features

# Flax leaf (under …/conv or …/bn) → PyTorch state-dict leaf.
TORCH_LEAF = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
}


class InceptionWeightsError(WeightsMismatchError):
    """A FID Inception state dict whose keys or shapes are not those of the FID Inception-v3."""


def conv_kernel(weight: np.ndarray) -> np.ndarray:
    """PyTorch conv weight [O, I, kh, kw] → Flax kernel [kh, kw, I, O]."""
    return np.transpose(weight, (2, 3, 1, 0))


def torch_name(path: tuple[str, ...]) -> str:
    """Flax param path → PyTorch key: ``("Mixed_5b", "branch1x1", "bn", "mean")`` →
    ``"Mixed_5b.branch1x1.bn.running_mean"``."""
    return ".".join((*path[:-1], TORCH_LEAF[path[-1]]))


def _expected() -> dict[tuple[str, ...], tuple[int, ...]]:
    return {path: leaf.shape for path, leaf in traverse_util.flatten_dict(abstract_params()).items()}


def _few(keys: Any, n: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" … ({len(keys)} in all)" if len(keys) > n else "")


def params_from_state_dict(state: dict[str, np.ndarray], source: str = "state dict") -> dict:
    """PyTorch-named FID Inception state dict → the ``"params"`` tree of ``FIDInceptionV3`` (float32).

    Raises :class:`InceptionWeightsError` on missing or unexpected keys or wrong shapes."""
    used = {
        k: v for k, v in state.items() if not k.startswith(UNUSED) and not k.endswith(".num_batches_tracked")
    }
    expected = _expected()
    names = {torch_name(path): path for path in expected}
    missing, unexpected = set(names) - set(used), set(used) - set(names)
    if missing or unexpected:
        raise InceptionWeightsError(
            f"{source} is not the FID Inception-v3 state dict: missing keys [{_few(missing)}], unexpected "
            f"keys [{_few(unexpected)}]. Use pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
            f"({FID_WEIGHTS_URL})."
        )
    flat = {}
    for name, path in names.items():
        value = np.asarray(used[name], dtype=np.float32)
        if path[-2:] == ("conv", "kernel") and value.ndim == 4:  # BatchNorm vectors stay as they are
            value = conv_kernel(value)
        if value.shape != expected[path]:
            raise InceptionWeightsError(
                f"{source}: {name} has shape {tuple(np.shape(used[name]))}, which does not give the expected "
                f"{'/'.join(path)} {expected[path]}; is this the FID Inception weights file?"
            )
        flat[path] = value
    return traverse_util.unflatten_dict(flat)


def _torch_state_dict(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as err:
        raise ValueError(f"{path} is a PyTorch pickle and torch is not installed: {CONVERT_HINT}.") from err
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # not a zip/pickle, or it holds objects weights_only refuses
        raise ValueError(f"{path}: not a readable PyTorch state dict ({type(err).__name__}: {err}).") from err
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise InceptionWeightsError(f"{path} holds a {type(state).__name__}, not a state dict.")
    tensors = {k: v.detach().cpu() for k, v in state.items() if isinstance(v, torch.Tensor)}
    return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in tensors.items()}


def read_fid_inception_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The PyTorch-named tensors of a ``.pth`` (needs torch; ``weights_only=True``) or ``.safetensors``
    FID Inception file, as numpy arrays."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path}: no such file. FID needs the FID Inception weights: download pytorch-fid's "
            f"{FID_WEIGHTS_URL} and pass its local path (or its .safetensors conversion)."
        )
    if path.endswith(".safetensors"):
        return safetensors_io.load(path)
    if path.endswith((".pth", ".pt", ".bin")):
        return _torch_state_dict(path)
    raise ValueError(f"{path}: expected the FID Inception weights as a .pth or .safetensors file.")


def load_fid_inception_params(path: str | os.PathLike) -> dict:
    """The ``"params"`` tree of ``FIDInceptionV3`` (float32 numpy leaves) from the official
    ``pt_inception-2015-12-05-*.pth`` or its ``.safetensors`` conversion (same keys)."""
    return params_from_state_dict(read_fid_inception_state_dict(path), os.fspath(path))


def convert_fid_inception(src: str | os.PathLike, dst: str | os.PathLike) -> int:
    """Write ``src`` (``.pth``, read with torch; checked first) as a ``.safetensors`` file ``dst`` with
    the same keys (floats as float32), so that hosts without torch can load it. Returns the number of
    tensors written."""
    if not os.fspath(dst).endswith(".safetensors"):
        raise ValueError(f"{dst}: the destination must end in .safetensors.")
    state = read_fid_inception_state_dict(src)
    params_from_state_dict(state, os.fspath(src))  # refuse to write a file the loader would reject
    tensors = {k: np.asarray(v, np.float32) if v.dtype.kind == "f" else v for k, v in state.items()}
    safetensors_io.save(dst, tensors, metadata={"source": os.path.basename(os.fspath(src))})
    return len(tensors)
