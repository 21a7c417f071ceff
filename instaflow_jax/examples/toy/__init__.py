"""The small-scale reproduction (``instaflow-toy``): the whole InstaFlow method on procedural
shapes in pixel space, with the package's own models, samplers, trainer and triplet generator.

  config.py      the run's config and its variants (tiny, quality)
  data.py        procedural shapes and prompts (an image dataset, by import path ``DATASET``)
  models.py      the untrained pixel-space pipeline (random UNet, frozen random text encoder)
  starts.py      the stages' starting folders (the output-negated teacher), written once
  stages.py      the nine stages and ``run_toy`` (resumable)
  classifier.py  the evaluation's feature extractor; evaluate.py FID, prompt accuracy, figures
  figures.py     the plots; summary.py the paper's claims checked and ``summary.md``
  controls.py    controls of a finished run (benchmarks/toy_controls.py)
  main.py        the command line (``python -m instaflow_jax.examples.toy``)
"""

from instaflow_jax.examples.toy.main import expand_variant, run, use_every_core
from instaflow_jax.examples.toy.stages import STAGES, distill, run_toy, teacher_start
from instaflow_jax.examples.toy.summary import check_claims, write_summary

__all__ = [
    "STAGES",
    "check_claims",
    "distill",
    "expand_variant",
    "run",
    "run_toy",
    "teacher_start",
    "use_every_core",
    "write_summary",
]
