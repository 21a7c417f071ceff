"""The training job as nested frozen dataclasses (built from ``configs/*.py`` by ``from_dict``).

Objectives (docs/method.md §4): ``reflow`` (2-Rectified Flow from SD triplets), ``distill`` (one-step
student from the 2-RF), ``direct_distill`` (the same from the SD teacher: the paper's baseline)
and ``teacher_pretrain`` (ε-prediction diffusion, for small experiments without a teacher).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from instaflow_jax.config_utils import from_dict
from instaflow_jax.data.prompts import PromptSource
from instaflow_jax.models.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from instaflow_jax.sampling.noise import MAX_SEED
from instaflow_jax.sampling.text_to_image import (
    RECTIFIED_FLOW_TEACHER,
    SOLVERS,
    SamplerSpec,
    TeacherSpec,
)
from instaflow_jax.sampling.velocity import guidance_enabled

OBJECTIVES = ("reflow", "distill", "direct_distill", "teacher_pretrain")
DATA_KINDS = ("triplets", "prompts", "images")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warm-up then a constant or cosine schedule, and grad-norm clipping."""

    learning_rate: float = 1e-6
    warmup_steps: int = 1000
    schedule: str = "constant"  # constant | cosine
    final_lr_fraction: float = 0.0  # cosine: lr at the end / peak lr
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 1e-2
    clip_norm: float = 1.0  # 0 disables clipping


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """``triplets``: a folder of ``generate_triplets`` (x0, x1, prompt); ``prompts``: prompts +
    noise from (seed, index), targets computed online; ``images``: an image dataset (images,
    prompt) found by registered name or import path (``data/images.py``), for teacher pre-training."""

    kind: str = "triplets"
    path: str = ""  # triplets folder
    prompts: PromptSource = dataclasses.field(default_factory=PromptSource)
    images: str = ""  # image dataset (kind=images): a registered name or "package.module:Factory"
    num_images: int = 0
    seed: int = 0  # shuffling (and noise for kind=prompts)


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """The frozen teacher for targets computed online (distillation without stored X1).

    Defaults: the 2-RF teacher of one-step distillation (docs/method.md §4.3,
    :data:`RECTIFIED_FLOW_TEACHER`: 25 Euler steps, CFG 1.5). Direct distillation from an SD
    teacher computed online needs ``solver="dpmpp2m"`` (and ``guidance_scale=5.0`` to match
    ``generate_triplets``' SD default, :data:`SD_TEACHER`).
    Targets go through the same ``sampling.text_to_image`` path as stored triplets; the
    unconditional prompt is always "" here (no negative-prompt key: a teacher with one is
    distilled from its stored triplets).
    """

    model: str = ""  # pipeline folder; "" = take X1 from the triplet data
    solver: str = RECTIFIED_FLOW_TEACHER.solver  # euler (2-RF) | dpmpp2m (SD, direct distillation)
    num_steps: int = RECTIFIED_FLOW_TEACHER.num_steps
    guidance_scale: float = RECTIFIED_FLOW_TEACHER.guidance_scale  # CFG against the empty prompt

    def spec(self) -> TeacherSpec:
        """How this teacher samples (the same function stores triplets)."""
        return TeacherSpec(self.solver, self.num_steps, self.guidance_scale)


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """A PNG grid of samples from the EMA weights every ``every`` steps (0 = never)."""

    every: int = 1000
    prompts: tuple[str, ...] = (
        "a photo of a cat",
        "a red sports car",
        "a bowl of fruit",
        "a lighthouse at dusk",
    )
    num_steps: int = 1
    guidance_scale: float = 0.0
    seed: int = 0
    # "euler" for a velocity UNet (reflow, distillation) | "dpmpp2m" for an ε-prediction UNet
    # (teacher_pretrain: set it in that job's config).
    solver: str = "euler"


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """``jax.distributed.initialize`` arguments; empty address = auto-detect (TPU, SLURM …)."""

    enabled: bool = False
    coordinator_address: str = ""
    num_processes: int = 0
    process_id: int = -1
    cpu_collectives: str = "gloo"
    # How long a process waits for the others to connect at start, and at the start-up barriers
    # (after loading models; after compiling, right before the first collective). Hosts can be
    # minutes apart: a slow compile, slow storage, a cold compilation cache on one of them.
    initialization_timeout_s: int = 900
    barrier_timeout_s: int = 1800


@dataclasses.dataclass(frozen=True)
class ProfileConfig:
    """A ``jax.profiler`` trace of steps [start_step, start_step + num_steps) written by process 0
    under ``workdir/tensorboard/plugins/profile/`` (TensorBoard's Profile tab; also a Perfetto
    ``*.trace.json.gz``). ``num_steps`` 0 = no trace."""

    start_step: int = 10  # optimizer steps done before the trace starts (skip compile and warm-up)
    num_steps: int = 0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    objective: str = "reflow"
    init_from: str = ""  # pipeline folder: student UNet init, frozen text encoder and VAE
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    teacher: TeacherConfig = dataclasses.field(default_factory=TeacherConfig)
    height: int = 512
    width: int = 512
    batch_size: int = 64  # global, per optimizer step
    grad_accum: int = 1  # micro-batches per step (batch_size must be divisible)
    num_steps: int = 1000
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    ema_decay: float = 0.9999
    prompt_dropout: float = 0.1  # probability of training on "" (keeps CFG usable)
    t_min: float = 0.0  # reflow: t ~ U[t_min, t_max]
    t_max: float = 1.0
    loss: str = "l2"  # distill: l2 | lpips
    lpips_weights_dir: str = ""
    lpips_resize: int = 224  # resize decoded images before LPIPS (0 = keep)
    dtype: str = "bfloat16"  # compute
    param_dtype: str = "float32"  # master weights
    remat: bool = False  # recompute UNet blocks in the backward pass: SD 1.5 at 512², batch 48 fits 80 GB
    # Attention in the UNet, VAE and text encoder (instaflow_jax/models/attention.py): auto |
    # xla | blockwise | cudnn | pallas_tpu. "auto" = Pallas kernel on TPU, cuDNN on GPU in
    # half precision, else blockwise for large score matrices; results do not depend on it.
    attention: str = "auto"
    fsdp: bool = False  # shard params and optimizer state over the data axis
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)
    export_ema: bool = True  # export the EMA (else raw) UNet at the end
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    profile: ProfileConfig = dataclasses.field(default_factory=ProfileConfig)

    # Keys that may change when a run is resumed (everything else must match the checkpoint).
    RESUMABLE_CHANGES = (
        "num_steps",
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
        "sample",
        "distributed",
        "attention",
        "profile",
    )

    @classmethod
    def from_config(cls, config: Any) -> TrainConfig:
        parsed = from_dict(cls, config)
        parsed.validate()
        return parsed

    def sample_spec(self) -> SamplerSpec:
        """The sample grids' :class:`SamplerSpec`: ``sample.solver``, ``sample.num_steps``, CFG iff
        ``sample.guidance_scale`` > 1, decoded images."""
        s = self.sample
        return SamplerSpec(s.num_steps, s.solver, guidance_enabled(s.guidance_scale), "image")

    def validate(self) -> None:
        problems = []
        if self.objective not in OBJECTIVES:
            problems.append(f"objective {self.objective!r} (expected one of {OBJECTIVES})")
        if self.data.kind not in DATA_KINDS:
            problems.append(f"data.kind {self.data.kind!r} (expected one of {DATA_KINDS})")
        if self.batch_size < 1 or self.grad_accum < 1 or self.batch_size % self.grad_accum:
            problems.append(
                f"batch_size {self.batch_size} must be a positive multiple of grad_accum {self.grad_accum}"
            )
        if self.loss not in ("l2", "lpips"):
            problems.append(f"loss {self.loss!r} (expected l2 or lpips)")
        if self.optimizer.schedule not in ("constant", "cosine"):
            problems.append(f"optimizer.schedule {self.optimizer.schedule!r} (expected constant or cosine)")
        if not 0.0 <= self.prompt_dropout <= 1.0 or not 0.0 <= self.t_min < self.t_max <= 1.0:
            problems.append("prompt_dropout must lie in [0, 1] and 0 ≤ t_min < t_max ≤ 1")
        if not self.init_from:
            problems.append("init_from (a pipeline folder) is required")
        if (
            self.objective in ("distill", "direct_distill")
            and self.data.kind == "prompts"
            and not self.teacher.model
        ):
            problems.append("distillation from prompts needs teacher.model to compute targets online")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            problems.append(f"attention {self.attention!r} (expected one of {ATTENTION_IMPLEMENTATIONS})")
        if self.sample.solver not in SOLVERS:
            problems.append(f"sample.solver {self.sample.solver!r} (expected one of {SOLVERS})")
        if self.teacher.solver not in SOLVERS:
            problems.append(f"teacher.solver {self.teacher.solver!r} (expected one of {SOLVERS})")
        if self.objective == "teacher_pretrain" and self.data.kind != "images":
            problems.append("teacher_pretrain trains on images: set data.kind='images'")
        if self.objective == "teacher_pretrain" and self.sample.every and self.sample.solver == "euler":
            problems.append(
                "teacher_pretrain trains an ε-prediction UNet, which Euler cannot sample: set "
                "sample.solver='dpmpp2m' (or sample.every=0)"
            )
        problems += self._range_problems()
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems) + ".")

    def _range_problems(self) -> list[str]:
        """Every numeric setting outside its range, as 'name value (expected …)'."""
        o, s = self.optimizer, self.sample
        checks = [
            ("num_steps", self.num_steps, self.num_steps >= 1, "≥ 1"),
            ("log_every", self.log_every, self.log_every >= 1, "≥ 1"),
            ("checkpoint_every", self.checkpoint_every, self.checkpoint_every >= 1, "≥ 1"),
            ("keep_checkpoints", self.keep_checkpoints, self.keep_checkpoints >= 1, "≥ 1, to resume from"),
            ("ema_decay", self.ema_decay, 0.0 <= self.ema_decay < 1.0, "in [0, 1)"),
            ("optimizer.learning_rate", o.learning_rate, o.learning_rate > 0, "> 0"),
            ("optimizer.warmup_steps", o.warmup_steps, o.warmup_steps >= 0, "≥ 0"),
            ("optimizer.final_lr_fraction", o.final_lr_fraction, 0 <= o.final_lr_fraction <= 1, "in [0, 1]"),
            ("optimizer.b1", o.b1, 0 <= o.b1 < 1, "in [0, 1)"),
            ("optimizer.b2", o.b2, 0 <= o.b2 < 1, "in [0, 1)"),
            ("optimizer.eps", o.eps, o.eps > 0, "> 0"),
            ("optimizer.weight_decay", o.weight_decay, o.weight_decay >= 0, "≥ 0"),
            ("optimizer.clip_norm", o.clip_norm, o.clip_norm >= 0, "≥ 0 (0 = off)"),
            ("height", self.height, self.height >= 8 and self.height % 8 == 0, "a positive multiple of 8"),
            ("width", self.width, self.width >= 8 and self.width % 8 == 0, "a positive multiple of 8"),
            ("lpips_resize", self.lpips_resize, self.lpips_resize >= 0, "≥ 0 (0 = keep)"),
            ("teacher.num_steps", self.teacher.num_steps, self.teacher.num_steps >= 1, "≥ 1"),
            (
                "teacher.guidance_scale",
                self.teacher.guidance_scale,
                _finite_nonneg(self.teacher.guidance_scale),
                "finite, ≥ 0",
            ),
            ("sample.every", s.every, s.every >= 0, "≥ 0 (0 = never)"),
            ("profile.start_step", self.profile.start_step, self.profile.start_step >= 0, "≥ 0"),
            ("profile.num_steps", self.profile.num_steps, self.profile.num_steps >= 0, "≥ 0 (0 = off)"),
            ("sample.num_steps", s.num_steps, s.num_steps >= 1, "≥ 1"),
            ("sample.guidance_scale", s.guidance_scale, _finite_nonneg(s.guidance_scale), "finite, ≥ 0"),
            (
                "distributed.initialization_timeout_s",
                self.distributed.initialization_timeout_s,
                self.distributed.initialization_timeout_s >= 1,
                "≥ 1",
            ),
            (
                "distributed.barrier_timeout_s",
                self.distributed.barrier_timeout_s,
                self.distributed.barrier_timeout_s >= 1,
                "≥ 1",
            ),
        ]
        for name, seed in (("seed", self.seed), ("data.seed", self.data.seed), ("sample.seed", s.seed)):
            checks.append((name, seed, 0 <= seed <= MAX_SEED, f"in 0…{MAX_SEED}"))
        return [f"{name} {value!r} (expected {expected})" for name, value, ok, expected in checks if not ok]


def _finite_nonneg(x: float) -> bool:
    return math.isfinite(x) and x >= 0


# Keys of configs saved by earlier versions that no longer exist. A checkpoint holds its own
# weights, so dropping them changes nothing for resuming or exporting it.
REMOVED_KEYS = ("init_unet_from_scratch", "init_output_sign")  # the toy's starts: examples/toy/starts.py


def upgrade_saved_config(saved: dict[str, Any]) -> dict[str, Any]:
    """A config stored in a checkpoint by an earlier version, in today's keys: the removed keys
    dropped, and ``sample.solver`` (once implied by the objective) filled with what it meant."""
    saved = {k: v for k, v in saved.items() if k not in REMOVED_KEYS}
    sample = dict(saved.get("sample", {}))
    if not sample.get("solver"):
        sample["solver"] = "dpmpp2m" if saved.get("objective") == "teacher_pretrain" else "euler"
        saved["sample"] = sample
    return saved
