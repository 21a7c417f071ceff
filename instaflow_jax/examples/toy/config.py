"""Config of the small-scale reproduction (``instaflow-toy``).

Variants: (default) ≈ 14 min on 2 idle CPU cores; ``tiny`` — every stage in a few minutes, for CI;
``quality`` — longer training and more evaluation samples for clearer numbers (≈ 1 h on 2 cores).
"""

from __future__ import annotations

from ml_collections import ConfigDict


def get_config(variant: str = "") -> ConfigDict:
    config = ConfigDict()
    config.seed = 0
    config.image_size = 16
    config.dtype = "float32"  # CPU; "bfloat16" on accelerators
    # Each training stage saves this many checkpoints (resume points), the last at its final step.
    config.checkpoints_per_stage = 4
    # Reflow and direct distillation start from the ε-teacher with its output layer negated
    # (v ≈ −ε̂): with a few hundred steps, starting from +ε̂ stalls (see docs/toy_results.md).
    # The toy writes that start as a pipeline folder (starts.py); 1 starts from the teacher as is.
    config.init_output_sign = -1
    config.model = ConfigDict({"widths": (32, 64), "heads": 4, "text_width": 64, "text_layers": 2})
    # Stage 1: the SD-like teacher (ε-prediction), sampled with DPM-Solver++ and CFG.
    config.teacher = ConfigDict(
        {
            "steps": 1000,
            "batch_size": 32,
            "learning_rate": 2e-3,
            "ema_decay": 0.995,
            "prompt_dropout": 0.1,
            "guidance": 3.0,
            "solver_steps": 25,
        }
    )
    # Teacher triplets and 2-RF triplets: one per prompt of this many toy prompts.
    config.triplets = ConfigDict({"num": 512, "prompt_seed": 7, "batch": 128, "shard_size": 256})
    # Stage 2: reflow → 2-Rectified Flow, sampled with Euler and CFG.
    config.reflow = ConfigDict(
        {
            "steps": 400,
            "batch_size": 32,
            "learning_rate": 1e-3,
            "ema_decay": 0.995,
            "prompt_dropout": 0.1,
            "guidance": 1.5,
            "euler_steps": 25,
        }
    )
    # Stage 3: one-step distillation (2-RF → InstaFlow) and the direct baseline (teacher → one step).
    config.distill = ConfigDict({"steps": 200, "batch_size": 32, "learning_rate": 1e-3, "ema_decay": 0.99})
    # Optional LPIPS stage after the L2 distillation, run when the weights are found locally.
    config.lpips = ConfigDict({"weights_dir": "", "steps": 100, "resize": 64})
    config.eval = ConfigDict(
        {
            "num_samples": 256,
            "seed": 99,
            "classifier_steps": 300,
            "straightness_samples": 64,
            "teacher_steps": (1, 2, 4, 25),
            "rf_steps": (1, 2, 4, 25),
            "grid_prompts": 8,
        }
    )

    if variant == "tiny":
        config.model.widths = (16, 32)
        config.checkpoints_per_stage = 1  # 10-step stages: a resume point costs more than a restart
        config.teacher.steps, config.teacher.solver_steps = 20, 4
        config.triplets.num, config.triplets.batch, config.triplets.shard_size = 32, 16, 16
        config.reflow.steps, config.reflow.euler_steps = 10, 4
        config.distill.steps = 10
        config.teacher.batch_size = config.reflow.batch_size = config.distill.batch_size = 8
        config.lpips.steps = 4
        config.eval.num_samples, config.eval.classifier_steps, config.eval.straightness_samples = 32, 20, 8
        config.eval.teacher_steps = config.eval.rf_steps = (1, 4)
        config.eval.grid_prompts = 4
    elif variant == "quality":
        config.teacher.steps = 3000
        config.triplets.num = 4096
        config.reflow.steps = 2000
        config.distill.steps = 1500
        config.lpips.steps = 500
        config.eval.num_samples, config.eval.classifier_steps = 1024, 600
    elif variant:
        raise ValueError(f"unknown toy variant {variant!r}; expected '', 'tiny' or 'quality'.")
    return config
