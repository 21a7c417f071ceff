"""Our numpy safetensors reader/writer against the reference ``safetensors`` library."""

from __future__ import annotations

import json
import os
import re
import struct
import threading

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as ref_load_numpy
from safetensors.numpy import save_file as ref_save_numpy
from safetensors.torch import load_file as ref_load_torch
from safetensors.torch import save_file as ref_save_torch

from instaflow_jax.weights import safetensors_io
from instaflow_jax.weights.safetensors_io import SafetensorsError


def _tensors():
    rng = np.random.default_rng(0)
    return {
        "a.weight": rng.standard_normal((3, 4, 2, 2)).astype(np.float32),
        "b.half": rng.standard_normal((5,)).astype(np.float16),
        "c.ids": rng.integers(0, 100, (2, 7)).astype(np.int64),
        "d.empty": np.zeros((0, 3), np.float32),
        "e.scalar": np.array(3.5, np.float64),
    }


def test_reads_what_the_reference_writes(tmp_path):
    tensors = _tensors()
    ref_save_numpy(tensors, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    ours = safetensors_io.load(tmp_path / "x.safetensors")
    assert ours.keys() == tensors.keys()
    for key, value in tensors.items():
        assert ours[key].dtype == value.dtype and ours[key].shape == value.shape
        np.testing.assert_array_equal(ours[key], value)


def test_reference_reads_what_we_write(tmp_path):
    tensors = _tensors()
    safetensors_io.save(tmp_path / "x.safetensors", tensors, metadata={"format": "pt"})
    ref = ref_load_numpy(str(tmp_path / "x.safetensors"))
    for key, value in tensors.items():
        np.testing.assert_array_equal(ref[key], value)


def test_bfloat16_both_ways(tmp_path):
    values = torch.randn(4, 6).to(torch.bfloat16)
    ref_save_torch({"w": values}, str(tmp_path / "ref.safetensors"))
    ours = safetensors_io.load(tmp_path / "ref.safetensors")["w"]
    assert ours.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(ours.astype(np.float32), values.float().numpy())
    safetensors_io.save(tmp_path / "ours.safetensors", {"w": ours})
    back = ref_load_torch(str(tmp_path / "ours.safetensors"))["w"]
    assert back.dtype == torch.bfloat16 and torch.equal(back, values)


def test_truncated_file_names_the_tensor(tmp_path):
    path = tmp_path / "x.safetensors"
    ref_save_numpy(_tensors(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-7])
    with pytest.raises(SafetensorsError, match="truncated"):
        safetensors_io.load(path)


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"abc", "too short"),
        (struct.pack("<Q", 10**6) + b"{}", "does not fit"),
        (struct.pack("<Q", 5) + b"{not ", "cannot be parsed"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
    ],
)
def test_garbage_is_refused(tmp_path, payload, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(payload)
    with pytest.raises(SafetensorsError, match=message):
        safetensors_io.load(path)


def test_inconsistent_header_is_refused(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(SafetensorsError, match="corrupted"):
        safetensors_io.load(path)


def test_temporary_names_are_unique_per_writer(tmp_path):
    from instaflow_jax.files import temporary_path

    names = {temporary_path(tmp_path / "x.safetensors").name for _ in range(100)}
    assert len(names) == 100
    pattern = rf"x\.safetensors\.{os.getpid()}\.[0-9a-f]{{12}}\.tmp"
    assert all(re.fullmatch(pattern, name) for name in names), sorted(names)[:3]


def test_concurrent_writers_of_one_file_never_collide(tmp_path):
    """Two threads save different tensors to one path 200 times each: no error, and the file
    always holds one writer's complete tensors (the rename is atomic), no temporary file left."""
    path = tmp_path / "x.safetensors"
    contents = [{"w": np.full((64, 64), float(i), np.float32)} for i in range(2)]
    errors: list[BaseException] = []

    def writer(tensors):
        try:
            for _ in range(200):
                safetensors_io.save(path, tensors)
                assert safetensors_io.load(path)["w"][0, 0] in (0.0, 1.0)
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(c,)) for c in contents]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[:3]
    final = ref_load_numpy(str(path))["w"]
    assert any(np.array_equal(final, c["w"]) for c in contents)
    assert os.listdir(tmp_path) == ["x.safetensors"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "x.safetensors"
    safetensors_io.save(path, {"w": np.ones(3, np.float32)})
    before = path.read_bytes()
    with pytest.raises(ValueError, match="cannot be stored"):
        safetensors_io.save(path, {"a": np.ones(3, np.float32), "z": np.ones(3, np.complex64)})
    from instaflow_jax.files import atomic_open

    with pytest.raises(RuntimeError, match="disk on fire"), atomic_open(path) as f:
        f.write(b"half a file")
        raise RuntimeError("disk on fire")
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["x.safetensors"]
