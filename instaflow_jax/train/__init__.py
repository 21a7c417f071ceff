"""Training: objectives (reflow, distill, direct_distill, teacher_pretrain), the trainer,
checkpoints, LPIPS and export. Entry point: ``python -m instaflow_jax.train``."""
