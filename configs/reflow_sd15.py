"""Text-conditioned reflow: SD 1.5 → 2-Rectified Flow (docs/method.md §4.2).

Variants (``--config configs/reflow_sd15.py:VARIANT``):
  (none)  stage 1 of the paper: batch 64, 70k steps, AdamW lr 1e-6, EMA 0.9999, bf16, 512²;
  stage2  the paper's second phase: batch 1024 (as 16 × 64 accumulated per device group), 25k steps;
  tiny    the tiny random pipeline and the tiny triplets (make them first with
          ``python -m instaflow_jax.generate_triplets --config configs/triplets_sd15.py:tiny``).
Every other key keeps TrainConfig's default (instaflow_jax/train/config.py), e.g. batch 64,
AdamW lr 1e-6 with 1k warm-up steps, EMA 0.9999, bf16, 512²; override any on the command line.
"""

from ml_collections import ConfigDict

from instaflow_jax.config_utils import load_sibling_config

base = load_sibling_config(__file__, "base")


def get_config(variant: str = "") -> ConfigDict:
    """Stage 1 of the paper's reflow, or the ``stage2`` / ``tiny`` variant."""
    config = base.train_defaults()
    config.init_from = "stable-diffusion-v1-5"
    config.data.path = "triplets/sd15"
    config.num_steps = 70_000
    config.log_every = 50
    config.checkpoint_every = 1000
    config.sample.every = 2000

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
        raise base.unknown_variant(variant, ("", "stage2", "tiny"))
    return config
