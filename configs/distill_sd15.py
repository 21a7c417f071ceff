"""One-step distillation: 2-Rectified Flow → InstaFlow (method.md §4.3), and the direct baseline.

Variants (``--config configs/distill_sd15.py:VARIANT``):
  (none)       stage 1, L2 on latents: batch 1024, 21.5k steps, student from 2-RF, targets from
               triplets of the 2-RF (25 Euler steps, CFG 1.5; ``configs/triplets_sd15.py:2rf``);
  lpips        stage 2, LPIPS-VGG on decoded images resized to 224²: 18k steps, from stage 1's export;
  direct       direct distillation from SD 1.5 (the paper's baseline), on SD triplets;
  tiny         the tiny random pipeline as student and teacher, targets computed online (offline, CPU);
  tiny_lpips   the same with LPIPS (needs the LPIPS weights: lpips_weights_dir).
"""

import importlib.util
import os

from ml_collections import ConfigDict

_REFLOW = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reflow_sd15.py")


def _base() -> ConfigDict:
    spec = importlib.util.spec_from_file_location("reflow_sd15", _REFLOW)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("")


def get_config(variant: str = "") -> ConfigDict:
    config = _base()
    config.objective = "distill"
    config.init_from = "2_rectified_flow_from_sd_1_5"
    config.data.path = "triplets/2rf"
    config.batch_size = 1024
    config.num_steps = 21_500
    config.prompt_dropout = 0.0
    config.loss = "l2"
    config.sample.num_steps = 1

    if variant == "lpips":
        config.loss = "lpips"
        config.num_steps = 18_000
        config.init_from = "runs/distill_l2/export"
        config.lpips_weights_dir = "lpips-weights"
    elif variant == "direct":
        config.objective = "direct_distill"
        config.init_from = "stable-diffusion-v1-5"
        config.data.path = "triplets/sd15"
    elif variant in ("tiny", "tiny_lpips"):
        config.init_from = "tiny-random"
        config.data.kind = "prompts"
        config.data.prompts.path = os.path.join(os.path.dirname(_REFLOW), "data", "tiny_prompts.txt")
        config.teacher.model = "tiny-random"
        config.teacher.num_steps = 4
        config.height = config.width = 64
        config.batch_size = 4
        config.num_steps = 20
        config.optimizer.learning_rate, config.optimizer.warmup_steps = 1e-3, 2
        config.ema_decay = 0.9
        config.dtype = "float32"
        config.log_every = 5
        config.checkpoint_every = 10
        config.sample.every = 10
        config.sample.prompts = ("a small red circle at the top left", "a photo of a cat")
        if variant == "tiny_lpips":
            config.loss = "lpips"
            config.lpips_resize = 64
            config.lpips_weights_dir = "lpips-weights"
    elif variant:
        raise ValueError(
            f"unknown variant {variant!r}; expected '', 'lpips', 'direct', 'tiny' or 'tiny_lpips'."
        )
    return config
