"""Teacher triplets for reflow (SD 1.5 → X1) and for distillation (2-RF → X1).

Variants (``--config configs/triplets_sd15.py:VARIANT``):
  (none)    SD 1.5 teacher, 25-step DPM-Solver++, CFG 5 (paper §4 stage 1), 512², prompts from a text file;
  2rf       2-Rectified Flow teacher, 25 Euler steps, CFG 1.5 (distillation targets);
  tiny      a random tiny pipeline and 12 built-in prompts: runs offline on a CPU in seconds;
  tiny_2rf  the same with the Euler solver.
Every other key keeps TripletJob's default (instaflow_jax/generate_triplets.py). Override any key on
the command line, e.g. ``--config.output_dir=gs://bucket/triplets``.
"""

import os

from ml_collections import ConfigDict

from instaflow_jax.config_utils import load_sibling_config

base = load_sibling_config(__file__, "base")


def get_config(variant: str = "") -> ConfigDict:
    """The SD 1.5 triplets of the paper's stage 1, or one of the variants above."""
    config = base.triplet_defaults()
    # kind: text | jsonl | csv | parquet | tfds; the other keys: PromptSource (instaflow_jax/data/prompts.py)
    config.prompts.path = "prompts.txt"
    config.output_dir = "triplets/sd15"

    if variant in ("2rf", "tiny_2rf"):
        config.teacher.model = "2_rectified_flow_from_sd_1_5"
        config.teacher.solver = "euler"
        config.teacher.guidance_scale = 1.5
        config.output_dir = "triplets/2rf"
    if variant.startswith("tiny"):
        config.teacher.model = "tiny-random"
        config.teacher.dtype = "float32"
        config.teacher.num_steps = 4
        config.prompts.path = os.path.join(base.DATA_DIR, "tiny_prompts.txt")
        config.output_dir = "/tmp/instaflow-jax/triplets_" + variant
        config.height = config.width = 64
        config.shard_size = 5
        config.per_device_batch = 2
        config.latent_dtype = "float32"
    elif variant not in ("", "2rf"):
        raise base.unknown_variant(variant, ("", "2rf", "tiny", "tiny_2rf"))
    return config
