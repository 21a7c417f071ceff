"""Text-conditioned reflow: SD 1.5 → 2-Rectified Flow (docs/method.md §4.2).

Variants (``--config configs/reflow_sd15.py:VARIANT``):
  (none)  stage 1 of the paper: batch 64, 70k steps, AdamW lr 1e-6, EMA 0.9999, bf16, 512²;
  stage2  the paper's second phase: batch 1024 (as 16 × 64 accumulated per device group), 25k steps;
  tiny    the tiny random pipeline and the tiny triplets (make them first with
          ``python -m instaflow_jax.generate_triplets --config configs/triplets_sd15.py:tiny``).
"""

import dataclasses

from ml_collections import ConfigDict

from instaflow_jax.data.prompts import PromptSource
from instaflow_jax.train.config import ProfileConfig, TeacherConfig


def get_config(variant: str = "") -> ConfigDict:
    config = ConfigDict()
    config.objective = "reflow"
    config.init_from = "stable-diffusion-v1-5"
    config.init_unet_from_scratch = False
    config.data = ConfigDict(
        {"kind": "triplets", "path": "triplets/sd15", "images": "", "num_images": 0, "seed": 0}
    )
    # kind: text | jsonl | csv | parquet | tfds; the other keys: PromptSource (instaflow_jax/data/prompts.py)
    config.data.prompts = ConfigDict(dataclasses.asdict(PromptSource()))
    # For targets computed online (distillation without stored X1); keys: train.config.TeacherConfig.
    config.teacher = ConfigDict(dataclasses.asdict(TeacherConfig()))
    config.height = config.width = 512
    config.batch_size = 64
    config.grad_accum = 1
    config.num_steps = 70_000
    config.optimizer = ConfigDict(
        {
            "learning_rate": 1e-6,
            "warmup_steps": 1000,
            "schedule": "constant",
            "final_lr_fraction": 0.0,
            "b1": 0.9,
            "b2": 0.999,
            "eps": 1e-8,
            "weight_decay": 1e-2,
            "clip_norm": 1.0,
        }
    )
    config.ema_decay = 0.9999
    config.prompt_dropout = 0.1
    config.t_min, config.t_max = 0.0, 1.0
    config.loss = "l2"
    config.lpips_weights_dir = ""
    config.lpips_resize = 224
    config.dtype, config.param_dtype = "bfloat16", "float32"
    config.remat = False
    config.attention = "auto"  # auto | xla | blockwise | cudnn | pallas_tpu (models/attention.py)
    config.fsdp = False
    config.seed = 0
    config.log_every = 50
    config.checkpoint_every = 1000
    config.keep_checkpoints = 3
    config.sample = ConfigDict(
        {
            "every": 2000,
            "num_steps": 1,
            "guidance_scale": 0.0,
            "seed": 0,
            "prompts": ("a photo of a cat", "a red sports car", "a bowl of fruit", "a lighthouse at dusk"),
        }
    )
    config.export_ema = True
    config.distributed = ConfigDict(
        {
            "enabled": False,
            "coordinator_address": "",
            "num_processes": 0,
            "process_id": -1,
            "cpu_collectives": "gloo",
        }
    )
    # A jax.profiler trace of steps [start_step, start_step + num_steps) (0 = none), e.g.
    # --config.profile.num_steps=5; keys: train.config.ProfileConfig.
    config.profile = ConfigDict(dataclasses.asdict(ProfileConfig()))

    if variant == "stage2":
        config.batch_size, config.num_steps, config.grad_accum = 1024, 25_000, 16
    elif variant == "tiny":
        config.init_from = "tiny-random"
        config.data.path = "/tmp/instaflow-jax/triplets_tiny"
        config.height = config.width = 64
        config.batch_size = 4
        config.num_steps = 20
        config.optimizer.learning_rate, config.optimizer.warmup_steps = 1e-3, 2
        config.ema_decay = 0.9
        config.dtype = "float32"
        config.log_every = 5
        config.checkpoint_every = 10
        config.sample.every = 10
        config.sample.num_steps = 2
        config.sample.prompts = ("a small red circle at the top left", "a photo of a cat")
    elif variant:
        raise ValueError(f"unknown variant {variant!r}; expected '', 'stage2' or 'tiny'.")
    return config
