"""One-step distillation: 2-Rectified Flow → InstaFlow (docs/method.md §4.3), and the direct baseline.

Variants (``--config configs/distill_sd15.py:VARIANT``):
  (none)       stage 1, L2 on latents: batch 1024, 21.5k steps, student from 2-RF, targets from
               triplets of the 2-RF (25 Euler steps, CFG 1.5; ``configs/triplets_sd15.py:2rf``);
  lpips        stage 2, LPIPS-VGG on decoded images resized to 224²: 18k steps, from stage 1's export;
  direct       direct distillation from SD 1.5 (the paper's baseline), on SD triplets;
  tiny         the tiny random pipeline as student and teacher, targets computed online (offline, CPU);
  tiny_lpips   the same with LPIPS (needs the LPIPS weights: lpips_weights_dir).
The other keys are reflow's (``configs/reflow_sd15.py``; its ``tiny`` variant for the tiny ones).
"""

import os

from ml_collections import ConfigDict

from instaflow_jax.config_utils import load_sibling_config

base = load_sibling_config(__file__, "base")
reflow_sd15 = load_sibling_config(__file__, "reflow_sd15")


def get_config(variant: str = "") -> ConfigDict:
    """Stage 1 of the paper's distillation (L2), or one of the variants above."""
    tiny = variant in ("tiny", "tiny_lpips")
    # The tiny variants share reflow's tiny training settings (size, steps, optimizer, logging).
    config = reflow_sd15.get_config("tiny" if tiny else "")
    config.objective = "distill"
    config.prompt_dropout = 0.0
    config.sample.num_steps = 1
    if not tiny:
        config.init_from = "2_rectified_flow_from_sd_1_5"
        config.data.path = "triplets/2rf"
        config.batch_size = 1024
        config.num_steps = 21_500

    if variant == "lpips":
        config.loss = "lpips"
        config.num_steps = 18_000
        config.init_from = "runs/distill_l2/export"
        config.lpips_weights_dir = "lpips-weights"
    elif variant == "direct":
        config.objective = "direct_distill"
        config.init_from = "stable-diffusion-v1-5"
        config.data.path = "triplets/sd15"
    elif tiny:
        config.data.kind = "prompts"
        config.data.prompts.path = os.path.join(base.DATA_DIR, "tiny_prompts.txt")
        config.teacher.model = "tiny-random"
        config.teacher.num_steps = 4
        if variant == "tiny_lpips":
            config.loss = "lpips"
            config.lpips_resize = 64
            config.lpips_weights_dir = "lpips-weights"
    elif variant:
        raise base.unknown_variant(variant, ("", "lpips", "direct", "tiny", "tiny_lpips"))
    return config
