"""Teacher triplets for reflow (SD 1.5 → X1) and for distillation (2-RF → X1).

Variants (``--config configs/triplets_sd15.py:VARIANT``):
  (none)    SD 1.5 teacher, 25-step DPM-Solver++, CFG 5 (paper §4 stage 1), 512², prompts from a text file;
  2rf       2-Rectified Flow teacher, 25 Euler steps, CFG 1.5 (distillation targets);
  tiny      a random tiny pipeline and 12 built-in prompts: runs offline on a CPU in seconds;
  tiny_2rf  the same with the Euler solver.
Override any key on the command line, e.g. ``--config.output_dir=gs://bucket/triplets``.
"""

import dataclasses
import os

from ml_collections import ConfigDict

from instaflow_jax.data.prompts import PromptSource

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(variant: str = "") -> ConfigDict:
    config = ConfigDict()
    config.teacher = ConfigDict(
        {
            "model": "stable-diffusion-v1-5",  # a local diffusers folder (or a cached hub id)
            "solver": "dpmpp2m",
            "num_steps": 25,
            "guidance_scale": 5.0,
            "negative_prompt": "",
            "dtype": "bfloat16",
            "param_dtype": "float32",
        }
    )
    # kind: text | jsonl | csv | parquet | tfds; the other keys: PromptSource (instaflow_jax/data/prompts.py)
    config.prompts = ConfigDict(dataclasses.asdict(PromptSource()))
    config.prompts.path = "prompts.txt"
    config.output_dir = "triplets/sd15"
    config.height = 512
    config.width = 512
    config.seed = 0
    config.shard_size = 1024
    config.per_device_batch = 8
    config.latent_dtype = "float16"
    config.store_x0 = False
    config.distributed = False
    config.verify = "size"  # finished shards on resume: size (+ sidecar checksum) | full (re-hash)

    if variant in ("2rf", "tiny_2rf"):
        config.teacher.model = "2_rectified_flow_from_sd_1_5"
        config.teacher.solver = "euler"
        config.teacher.guidance_scale = 1.5
        config.output_dir = "triplets/2rf"
    if variant.startswith("tiny"):
        config.teacher.model = "tiny-random"
        config.teacher.dtype = "float32"
        config.teacher.num_steps = 4
        config.prompts.path = os.path.join(HERE, "data", "tiny_prompts.txt")
        config.output_dir = "/tmp/instaflow-jax/triplets_" + variant
        config.height = config.width = 64
        config.shard_size = 5
        config.per_device_batch = 2
        config.latent_dtype = "float32"
    elif variant not in ("", "2rf"):
        raise ValueError(f"unknown variant {variant!r}; expected '', '2rf', 'tiny' or 'tiny_2rf'.")
    return config
