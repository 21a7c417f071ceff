"""MS COCO evaluation protocols: which captions are prompts and which images are the reference.

A local COCO folder holds the official layout::

    COCO/annotations/captions_val2017.json   COCO/val2017/000000000139.jpg …
    COCO/annotations/captions_val2014.json   COCO/val2014/COCO_val2014_000000000042.jpg …

or, for ``coco2014-30k``, a prepared tensorflow-datasets ``coco_captions/2014`` (``--coco
tfds:DATA_DIR``): its ``val``, ``test`` and ``restval`` splits together are val2014 (the Karpathy
splits cut val2014 in three). TFDS has no COCO 2017 captions, so ``coco2017-5k`` needs the folder.

A protocol draws ``num_images`` distinct images with a seeded permutation of the sorted image ids
and one of each image's captions (seeded too); the captions are the prompts, the same images the
FID reference. The draw is written into the results (``prompts.json`` and its digest) so two runs
can be checked to compare the same prompts.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any

import numpy as np
from etils import epath
from PIL import Image

from instaflow_jax.data.prompts import prepared_tfds_folder
from instaflow_jax.files import read_json

TFDS_PREFIX = "tfds:"
TFDS_VAL2014_SPLITS = ("val", "test", "restval")  # coco_captions/2014's Karpathy cut of val2014


class COCOFolderError(ValueError):
    """A COCO folder without the annotation file or images a protocol needs."""


@dataclasses.dataclass(frozen=True)
class Protocol:
    """One of the paper's evaluation settings.

    Attributes:
      name: ``coco2017-5k`` or ``coco2014-30k``.
      split: COCO split folder (``val2017``) and annotation suffix.
      num_images: prompts (= generated images = reference images).
      fid_size: square side both image sets are resized to before Inception (which then resizes to
        299² itself): 512 for FID-5k (the generations' size), 256 for FID-30k (the paper: "FID-30k
        on images resized to 256²").
    """

    name: str
    split: str
    num_images: int
    fid_size: int

    @property
    def annotation_file(self) -> str:
        return os.path.join("annotations", f"captions_{self.split}.json")


PROTOCOLS = {
    "coco2017-5k": Protocol("coco2017-5k", "val2017", 5000, 512),
    "coco2014-30k": Protocol("coco2014-30k", "val2014", 30000, 256),
}

# The paper's numbers (InstaFlow, Table 1/3): FID on the protocol, CLIP score (ViT-g/14) on 5k.
PAPER_NUMBERS = {
    "coco2017-5k": [
        ("SD 1.5, DPM-Solver++ 25 steps", 20.1, 0.318),
        ("2-Rectified Flow, Euler 25 steps", 21.5, 0.315),
        ("2-Rectified Flow, 1 step", 47.0, 0.271),
        ("InstaFlow-0.9B, 1 step", 23.4, 0.304),
        ("InstaFlow-1.7B, 1 step", 22.4, 0.309),
    ],
    "coco2014-30k": [
        ("SD 1.5, DPM-Solver++ 25 steps", 9.62, None),
        ("InstaFlow-0.9B, 1 step", 13.10, None),
        ("InstaFlow-1.7B, 1 step", 11.83, None),
    ],
}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; expected one of {sorted(PROTOCOLS)}.")
    return PROTOCOLS[name]


@dataclasses.dataclass(frozen=True)
class Sample:
    """One drawn (image, caption) pair; ``path`` is None for prompt files without images."""

    image_id: int
    caption: str
    path: str | None


def draw_samples(coco: str, protocol: Protocol, seed: int, num_images: int | None = None) -> list[Sample]:
    """The protocol's prompts and reference images from a local COCO folder or ``tfds:DATA_DIR``.

    ``num_images`` overrides the protocol's count (smaller test folders); fewer available images
    than asked is an error unless ``num_images`` is given.
    """
    if coco.startswith(TFDS_PREFIX):
        captions, paths, where = _tfds_captions(coco[len(TFDS_PREFIX) :], protocol)
    else:
        captions, paths, where = _folder_captions(coco, protocol)
    ids = sorted(i for i in captions if i in paths)
    wanted = protocol.num_images if num_images is None else int(num_images)
    if wanted < 2:
        raise ValueError(f"an evaluation needs at least 2 images (FID's covariance); got {wanted}.")
    if len(ids) < wanted:
        raise COCOFolderError(
            f"{where} has {len(ids)} captioned images; {protocol.name} needs {wanted}. Use the "
            "full annotation file, or pass --num-images to evaluate fewer (not comparable to the paper)."
        )
    rng = np.random.default_rng(seed)
    chosen = [ids[i] for i in rng.permutation(len(ids))[:wanted]]
    samples = []
    for image_id in chosen:
        options = captions[image_id]
        caption = options[int(rng.integers(len(options)))]
        samples.append(Sample(image_id, caption, paths[image_id]))
    missing = [s.path for s in samples if not s.path.startswith(TFDS_PREFIX) and not os.path.isfile(s.path)]
    if missing:
        raise COCOFolderError(
            f"{len(missing)} drawn images are missing, e.g. {missing[0]}; unpack the "
            f"{protocol.split} images into {os.path.join(coco, protocol.split)}."
        )
    return samples


def _clean(caption: Any) -> str:
    text = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
    return " ".join(text.split())


def _folder_captions(coco: str, protocol: Protocol) -> tuple[dict[int, list[str]], dict[int, str], str]:
    """(image id → captions, image id → image path, the annotation file) of a COCO folder."""
    annotation = os.path.join(coco, protocol.annotation_file)
    if not os.path.isfile(annotation):
        raise COCOFolderError(
            f"{annotation} not found: --coco must be a COCO folder with "
            f"{protocol.annotation_file} and {protocol.split}/ (download the {protocol.split[-4:]} "
            "annotations and validation images from cocodataset.org)."
        )
    data = read_json(annotation, fix="use the official COCO captions annotation file")
    paths = {
        int(im["id"]): os.path.join(coco, protocol.split, im["file_name"]) for im in data.get("images", [])
    }
    captions: dict[int, list[str]] = {}
    for entry in data.get("annotations", []):
        captions.setdefault(int(entry["image_id"]), []).append(_clean(entry["caption"]))
    return captions, paths, annotation


@functools.lru_cache(maxsize=8)
def _tfds_split(folder: str, split: str) -> Any:
    import tensorflow_datasets as tfds

    return tfds.builder_from_directory(folder).as_data_source(split=split)


def _tfds_captions(data_dir: str, protocol: Protocol) -> tuple[dict[int, list[str]], dict[int, str], str]:
    """(image id → captions, image id → ``tfds:folder:split:index``, the folder) of a prepared
    ``coco_captions/2014``; its val, test and restval splits make up val2014."""
    if protocol.split != "val2014":
        raise COCOFolderError(
            f"{protocol.name} needs COCO {protocol.split[-4:]} captions; tensorflow-datasets' "
            "coco_captions holds COCO 2014 only. Pass a local COCO folder with "
            f"{protocol.annotation_file} and {protocol.split}/ as --coco."
        )
    folder = str(prepared_tfds_folder(epath.Path(data_dir), "coco_captions/2014"))
    import tensorflow_datasets as tfds

    present = [s for s in TFDS_VAL2014_SPLITS if s in tfds.builder_from_directory(folder).info.splits]
    if not present:
        raise COCOFolderError(f"{folder} has none of the val2014 splits {TFDS_VAL2014_SPLITS}.")
    captions: dict[int, list[str]] = {}
    paths: dict[int, str] = {}
    for split in present:
        records = _tfds_split(folder, split)
        for index in range(len(records)):
            record = records[index]
            image_id = int(record["image/id"])
            captions[image_id] = [_clean(text) for text in record["captions"]["text"]]
            paths[image_id] = f"{TFDS_PREFIX}{folder}:{split}:{index}"
    return captions, paths, folder


def prompt_samples(prompts: list[str]) -> list[Sample]:
    """A custom prompt set (``--prompts FILE``): no reference images."""
    return [Sample(i, prompt, None) for i, prompt in enumerate(prompts)]


def samples_digest(samples: list[Sample]) -> str:
    """sha256 (16 hex digits) of the drawn image ids and captions, in order."""
    text = json.dumps([[s.image_id, s.caption] for s in samples], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _open_image(path: str) -> Image.Image:
    """A drawn sample's image: a file, or a record of a prepared TFDS split (``tfds:folder:split:i``)."""
    if path.startswith(TFDS_PREFIX):
        folder, split, index = path[len(TFDS_PREFIX) :].rsplit(":", 2)
        return Image.fromarray(np.asarray(_tfds_split(folder, split)[int(index)]["image"]))
    return Image.open(path)


def load_reference_image(path: str, size: int) -> np.ndarray:
    """A COCO image → float32 [size, size, 3] in [0, 1]: RGB, centre-cropped to a square, resized
    with PIL's bicubic filter (antialiased)."""
    with _open_image(path) as image:
        image = image.convert("RGB")
        width, height = image.size
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        return np.asarray(image, np.float32) / 255.0
