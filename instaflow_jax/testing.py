"""Random test inputs in real on-disk formats: ControlNets, LoRA files, mock TFDS captions,
LPIPS weights, synthetic triplets. The tiny pipelines themselves (also used at run time by
``tiny-random``) live in :mod:`instaflow_jax.weights.tiny` and are re-exported here.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from instaflow_jax.models import (
    UNetConfig,
)
from instaflow_jax.weights.tiny import (  # noqa: F401 (re-exported for tests)
    TINY_WORDS,
    make_tiny_pipeline,
    random_params,
    tiny_clip_config,
    tiny_random_folder,
    tiny_unet_config,
    tiny_vae_config,
    write_tiny_tokenizer,
)


def make_tiny_controlnet(folder: str, unet_config: UNetConfig | None = None, seed: int = 0) -> str:
    """Write a random SD 1.x-layout ``ControlNetModel`` folder matching a tiny UNet; returns ``folder``.

    Its condition encoder downsamples ×8 (channels 8, 8, 16, 16), like SD's, so control images
    have the output size. Loads with ``instaflow_jax.load_controlnet`` and PyTorch ``diffusers``.
    """
    from instaflow_jax.models.controlnet import ControlNetConfig, ControlNetModel
    from instaflow_jax.weights.folder import save_component

    u = unet_config or tiny_unet_config()
    config = ControlNetConfig(
        in_channels=u.in_channels,
        down_block_types=u.down_block_types,
        block_out_channels=u.block_out_channels,
        layers_per_block=u.layers_per_block,
        attention_head_dim=u.attention_head_dim,
        cross_attention_dim=u.cross_attention_dim,
        norm_num_groups=u.norm_num_groups,
        conditioning_embedding_out_channels=(8, 8, 16, 16),
    )
    module = ControlNetModel(config)
    save_component(folder, "controlnet", module, random_params(module, "controlnet", seed))
    return folder


def write_random_lora(path: str, params: dict, rank: int = 2, seed: int = 0, scale: float = 0.3) -> str:
    """Write a random kohya-format LoRA (``lora_unet_…``/``lora_te_…``, with ``alpha``) for the
    attention projections of a pipeline's ``params``; returns ``path``."""
    from instaflow_jax.weights import safetensors_io
    from instaflow_jax.weights.convert import flatten, flax_path_to_torch_key

    rng = np.random.default_rng(seed)
    tensors = {}
    for component, prefix, family in (("unet", "lora_unet_", "unet"), ("text_encoder", "lora_te_", "clip")):
        for key, leaf in flatten(params[component]).items():
            if key[-1] != "kernel" or key[-2] not in ("to_q", "to_k", "to_v", "q_proj", "v_proj"):
                continue
            name = prefix + flax_path_to_torch_key(key, family).removesuffix(".weight").replace(".", "_")
            fan_in, fan_out = np.shape(leaf)
            tensors[f"{name}.lora_down.weight"] = rng.standard_normal((rank, fan_in)).astype(np.float32)
            up = scale * rng.standard_normal((fan_out, rank))
            tensors[f"{name}.lora_up.weight"] = up.astype(np.float32)
            tensors[f"{name}.alpha"] = np.asarray(float(rank), np.float32)
    safetensors_io.save(path, tensors)
    return path


__all__ = [
    "make_tiny_controlnet",
    "make_tiny_pipeline",
    "random_params",
    "tiny_clip_config",
    "tiny_unet_config",
    "tiny_vae_config",
    "write_random_lora",
    "write_tiny_tokenizer",
]


def write_tfds_folder(folder: str, name: str, features: Any, splits: dict[str, list[dict]]) -> str:
    """Write a prepared tensorflow-datasets version folder (array_record, no TensorFlow): one
    shard per split of ``features``-encoded examples, and the metadata. Returns ``folder``."""
    import tensorflow_datasets as tfds
    from array_record.python.array_record_module import ArrayRecordWriter
    from tensorflow_datasets.core import example_serializer

    os.makedirs(folder, exist_ok=True)
    serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
    infos = []
    for split, examples in splits.items():
        writer = ArrayRecordWriter(
            os.path.join(folder, f"{name}-{split}.array_record-00000-of-00001"), "group_size:1"
        )
        for example in examples:
            writer.write(serializer.serialize_example(features.encode_example(example)))
        writer.close()
        infos.append(tfds.core.SplitInfo(name=split, shard_lengths=[len(examples)], num_bytes=0))
    tfds.folder_dataset.write_metadata(
        data_dir=folder,
        features=features,
        split_infos=infos,
        filename_template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
        check_data=False,
    )
    return folder


def write_mock_tfds_captions(
    data_dir: str, splits: dict[str, list[list[str]]], name: str = "coco_captions", config: str = "2014"
) -> str:
    """Write a prepared tensorflow-datasets folder (array_record, no TensorFlow) of captions.

    Each record is ``{"image/id": i, "captions": {"text": [...], "id": [...]}}`` like
    ``coco_captions``. Returns the version folder.
    """
    import tensorflow_datasets as tfds

    features = tfds.features.FeaturesDict(
        {
            "image/id": tfds.features.Scalar(dtype=np.int64),
            "captions": tfds.features.Sequence(
                {"text": tfds.features.Text(), "id": tfds.features.Scalar(dtype=np.int64)}
            ),
        }
    )
    examples = {
        split: [
            {"image/id": i, "captions": {"text": captions, "id": list(range(len(captions)))}}
            for i, captions in enumerate(records)
        ]
        for split, records in splits.items()
    }
    return write_tfds_folder(os.path.join(data_dir, name, config, "1.1.0"), name, features, examples)


VGG16_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))


def write_random_lpips_weights(folder: str, seed: int = 0) -> str:
    """Random VGG16 and linear-layer weights in lpips-j's h5 layout (for tests, no download).

    ``vgg16_weights.h5``: groups ``conv{b}_{l}`` with ``weight`` [3, 3, in, out] and ``bias``;
    ``lpips_lin.h5``: non-negative ``lin0`` … ``lin4`` [1, 1, C, 1].
    """
    import h5py

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    with h5py.File(os.path.join(folder, "vgg16_weights.h5"), "w") as f:
        channels = 3
        for block, (features, layers) in enumerate(VGG16_BLOCKS, 1):
            for layer in range(1, layers + 1):
                group = f.create_group(f"conv{block}_{layer}")
                scale = np.sqrt(2.0 / (9 * channels))
                group["weight"] = (scale * rng.standard_normal((3, 3, channels, features))).astype(np.float32)
                group["bias"] = (0.01 * rng.standard_normal(features)).astype(np.float32)
                channels = features
    with h5py.File(os.path.join(folder, "lpips_lin.h5"), "w") as f:
        for i, (features, _) in enumerate(VGG16_BLOCKS):
            f[f"lin{i}"] = np.abs(rng.standard_normal((1, 1, features, 1))).astype(np.float32) / features
    return folder


def write_synthetic_triplets(
    folder: str,
    num_samples: int,
    shard_size: int,
    shape: tuple[int, int, int] = (8, 8, 4),
    seed: int = 0,
    store_x0: bool = False,
    dtype: str = "float32",
) -> str:
    """A triplet dataset without a teacher (tests, loader benchmarks): ``x1`` [num_samples, *shape]
    standard normal in ``dtype`` (NHWC), prompt ``i`` = ``"prompt i"``; with ``store_x0``, ``x0``
    float32 is the generator's noise of (``seed``, index) (``noise_for_indices``)."""
    from instaflow_jax.data.shards import write_json, write_shard
    from instaflow_jax.data.triplets import FORMAT, VERSION
    from instaflow_jax.sampling.noise import noise_for_indices

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    noise = np.asarray(noise_for_indices(seed, np.arange(num_samples), shape)) if store_x0 else None
    for number, start in enumerate(range(0, num_samples, shard_size)):
        indices = np.arange(start, min(start + shard_size, num_samples))
        arrays = {"x1": rng.standard_normal((len(indices), *shape), np.float32).astype(dtype)}
        if noise is not None:
            arrays["x0"] = noise[indices]
        write_shard(folder, number, arrays, indices, [f"prompt {i}" for i in indices])
    latent = {"height": shape[0], "width": shape[1], "channels": shape[2], "layout": "NHWC"}
    manifest = {
        "format": FORMAT, "version": VERSION, "seed": seed, "store_x0": store_x0,
        "num_samples": num_samples, "shard_size": shard_size,
        "latent": {**latent, "scaling_factor": 0.18215, "dtype": dtype, "x0_dtype": "float32"},
    }  # fmt: skip
    write_json(os.path.join(folder, "manifest.json"), manifest)
    return folder
