"""FID arithmetic against pytorch-fid, the COCO protocol draw and the resumable feature folders."""

from __future__ import annotations

import importlib
import io
import json
import os
import sys
import types
from unittest import mock

import numpy as np
import pytest
from PIL import Image

from instaflow_jax.evaluation.coco import COCOFolderError, Protocol, draw_samples, load_reference_image
from instaflow_jax.evaluation.feature_shards import FeatureFolderMismatchError, FeatureShards
from instaflow_jax.evaluation.fid import (
    GaussianStats,
    StatisticsFileError,
    fid_from_features,
    frechet_distance,
)

CAPTIONS = ["a red circle", "a blue square", "two green triangles", "a yellow star", "a purple ring"]


def write_coco(folder: str, split: str = "val2017", count: int = 6, size: tuple[int, int] = (48, 40)) -> str:
    """A COCO-format folder: ``count`` random JPEGs with 2 captions each in the official layout."""
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(folder, "annotations"), exist_ok=True)
    os.makedirs(os.path.join(folder, split), exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        image_id = 1000 + 7 * i
        name = f"{image_id:012d}.jpg"
        pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, split, name), quality=95)
        images.append({"id": image_id, "file_name": name, "height": size[0], "width": size[1]})
        for j in range(2):
            caption = f"{CAPTIONS[(i + j) % len(CAPTIONS)]}  number {i}"
            annotations.append({"id": 10 * i + j, "image_id": image_id, "caption": caption})
    with open(os.path.join(folder, "annotations", f"captions_{split}.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations}, f)
    return folder


def import_fid_score() -> types.ModuleType:
    """``pytorch_fid.fid_score`` over the real torchvision, or over test_inception's stand-in (plus an
    empty ``torchvision.transforms``) where PyPI's CUDA torchvision cannot import beside CPU torch."""
    pytest.importorskip("pytorch_fid")
    try:
        return importlib.import_module("pytorch_fid.fid_score")
    except (ImportError, RuntimeError):
        pass
    from test_inception import torchvision_stand_in

    with mock.patch.dict(sys.modules):  # restored on exit
        for name in [n for n in sys.modules if n.split(".")[0] in ("torchvision", "pytorch_fid")]:
            del sys.modules[name]
        stand_in = torchvision_stand_in()
        stand_in["torchvision"].transforms = stand_in["torchvision.transforms"] = types.ModuleType(
            "transforms"
        )
        sys.modules.update(stand_in)
        return importlib.import_module("pytorch_fid.fid_score")


def test_frechet_distance_matches_pytorch_fid():
    fid_score = import_fid_score()
    rng = np.random.default_rng(1)
    a = rng.normal(size=(300, 16))
    b = rng.normal(size=(200, 16)) @ rng.normal(size=(16, 16)) * 0.5 + 0.3
    sa, sb = GaussianStats.from_features(a), GaussianStats.from_features(b)
    ours = frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)
    mu1, s1 = np.mean(a, axis=0), np.cov(a, rowvar=False)
    mu2, s2 = np.mean(b, axis=0), np.cov(b, rowvar=False)
    reference = fid_score.calculate_frechet_distance(mu1, s1, mu2, s2)
    assert ours > 1.0
    assert abs(ours - reference) <= 1e-4 * abs(reference)
    # Singular covariances (fewer samples than dimensions) take pytorch-fid's eps path too.
    c, d = rng.normal(size=(5, 16)), rng.normal(size=(6, 16)) + 1
    sc, sd = GaussianStats.from_features(c), GaussianStats.from_features(d)
    reference = fid_score.calculate_frechet_distance(sc.mu, sc.sigma, sd.mu, sd.sigma)
    assert abs(fid_from_features(c, d) - reference) <= 1e-4 * abs(reference)


def test_fid_closed_form_and_self_distance():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(400, 8))
    assert abs(fid_from_features(features, features)) < 1e-8
    # Diagonal Gaussians: ‖Δμ‖² + Σ (σ₁ − σ₂)².
    mu1, mu2 = np.arange(4.0), np.ones(4)
    var1, var2 = np.array([1.0, 2.0, 3.0, 4.0]), np.array([4.0, 1.0, 1.0, 9.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-10)


def test_statistics_files_round_trip_and_errors(tmp_path):
    stats = GaussianStats.from_features(np.random.default_rng(3).normal(size=(10, 3)))
    loaded = GaussianStats.load(stats.save(str(tmp_path / "ref.npz")))
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    assert loaded.count == 10
    np.savez(tmp_path / "pytorch_fid.npz", mu=stats.mu, sigma=stats.sigma)  # pytorch-fid --save-stats
    assert GaussianStats.load(str(tmp_path / "pytorch_fid.npz")).count == -1
    np.savez(tmp_path / "bad.npz", mean=stats.mu)
    with pytest.raises(StatisticsFileError, match="missing \\['mu', 'sigma'\\]"):
        GaussianStats.load(str(tmp_path / "bad.npz"))
    with pytest.raises(StatisticsFileError, match="not found"):
        GaussianStats.load(str(tmp_path / "absent.npz"))


def test_protocol_draw_is_seeded_distinct_and_complete(tmp_path):
    coco = write_coco(str(tmp_path / "coco"))
    protocol = Protocol("coco2017-5k", "val2017", 5000, 512)
    first = draw_samples(coco, protocol, seed=0, num_images=4)
    assert first == draw_samples(coco, protocol, seed=0, num_images=4)
    assert first != draw_samples(coco, protocol, seed=1, num_images=4)
    assert len({s.image_id for s in first}) == 4
    for sample in first:
        assert sample.caption.endswith(f"number {(sample.image_id - 1000) // 7}")  # its own caption
        assert "  " not in sample.caption and os.path.isfile(sample.path)
    with pytest.raises(COCOFolderError, match="needs 5000"):
        draw_samples(coco, protocol, seed=0)
    with pytest.raises(COCOFolderError, match=r"captions_val2014\.json not found"):
        draw_samples(coco, Protocol("coco2014-30k", "val2014", 30000, 256), seed=0)
    image = load_reference_image(first[0].path, 32)
    assert image.shape == (32, 32, 3) and image.dtype == np.float32 and 0 <= image.min() <= image.max() <= 1


def write_tfds_coco_captions(data_dir: str, coco: str) -> str:
    """The COCO folder's val2014 as a prepared ``coco_captions/2014`` (array_record, no TensorFlow),
    cut into val / test / restval like the Karpathy splits; JPEG bytes copied unchanged."""
    import tensorflow_datasets as tfds

    from instaflow_jax.testing import write_tfds_folder

    with open(os.path.join(coco, "annotations", "captions_val2014.json")) as f:
        data = json.load(f)
    features = tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(encoding_format="jpeg"),
            "image/id": tfds.features.Scalar(dtype=np.int64),
            "captions": tfds.features.Sequence(
                {"text": tfds.features.Text(), "id": tfds.features.Scalar(dtype=np.int64)}
            ),
        }
    )

    def example(image: dict) -> dict:
        texts = [a["caption"] for a in data["annotations"] if a["image_id"] == image["id"]]
        with open(os.path.join(coco, "val2014", image["file_name"]), "rb") as jpeg:
            encoded = io.BytesIO(jpeg.read())  # encoded by tfds as the file's bytes, unchanged
        return {
            "image": encoded,
            "image/id": image["id"],
            "captions": {"text": texts, "id": list(range(len(texts)))},
        }

    images = data["images"]
    splits = {"val": images[:2], "test": images[2:3], "restval": images[3:]}
    folder = os.path.join(data_dir, "coco_captions", "2014", "1.1.0")
    write_tfds_folder(
        folder, "coco_captions", features, {k: [example(i) for i in v] for k, v in splits.items()}
    )
    return data_dir


def test_tfds_coco_captions_give_the_folders_draw(tmp_path):
    coco = write_coco(str(tmp_path / "coco"), split="val2014")
    data_dir = write_tfds_coco_captions(str(tmp_path / "tfds"), coco)
    protocol = Protocol("coco2014-30k", "val2014", 30000, 256)
    from_folder = draw_samples(coco, protocol, seed=3, num_images=5)
    from_tfds = draw_samples("tfds:" + data_dir, protocol, seed=3, num_images=5)
    assert [(s.image_id, s.caption) for s in from_tfds] == [(s.image_id, s.caption) for s in from_folder]
    for a, b in zip(from_folder, from_tfds):
        np.testing.assert_array_equal(load_reference_image(a.path, 24), load_reference_image(b.path, 24))
    with pytest.raises(COCOFolderError, match="coco_captions holds COCO 2014 only"):
        draw_samples("tfds:" + data_dir, Protocol("coco2017-5k", "val2017", 5000, 512), seed=0)


def test_feature_shards_resume_and_refuse_other_evaluations(tmp_path):
    folder = str(tmp_path / "features")
    shards = FeatureShards(folder, total=10, batch_size=4, manifest={"model": "a"})
    assert shards.num_batches == 3 and shards.indices(2).tolist() == [8, 9]
    assert shards.todo(0, 2) == [0, 2] and shards.todo(1, 2) == [1]
    shards.write(0, {"x": np.arange(4.0)})
    again = FeatureShards(folder, total=10, batch_size=4, manifest={"model": "a"})
    assert again.todo() == [1, 2]
    with pytest.raises(RuntimeError, match="not done"):
        again.read()
    again.write(1, {"x": np.arange(4.0, 8.0)})
    again.write(2, {"x": np.arange(8.0, 10.0)})
    np.testing.assert_array_equal(again.read()["x"], np.arange(10.0))
    with pytest.raises(ValueError, match="expected 2"):
        again.write(2, {"x": np.arange(3.0)})
    with pytest.raises(FeatureFolderMismatchError, match="differs in \\['model'\\]"):
        FeatureShards(folder, total=10, batch_size=4, manifest={"model": "b"})
