"""What the web demo does, without the web: models, start-up compilation, requests, timing text.

Gradio-free, so it is tested directly; ``instaflow_jax.demo.app`` puts a page on top of it. Every
image comes from ``Pipeline.generate``; the interpolation tab feeds it slerped noise
(``instaflow_jax.sampling.interpolation``), as ``instaflow-interpolate`` does.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from instaflow_jax.conventions import latent_shape
from instaflow_jax.entry import USER_ERRORS
from instaflow_jax.image_io import save_gif
from instaflow_jax.pipeline import Pipeline, Timings
from instaflow_jax.precision import resolve_dtype
from instaflow_jax.sampling.interpolation import interpolation_latents
from instaflow_jax.sampling.velocity import guidance_enabled
from instaflow_jax.weights.tiny import TINY_RANDOM, resolve_model

DEFAULT_MODEL2_STEPS = (1, 2, 4, 8)
DEFAULT_MODEL2_GUIDANCE = 1.5  # docs/method.md §3: useful range 1–2 for the 2-Rectified Flow
GUIDANCE_RANGE = (1.0, 4.0)  # the page's slider; 1 = CFG off (docs/method.md §3: on only when g > 1)
CFG_ON_SCALE = 2.0  # any g > 1 compiles the CFG program; g itself is traced
MAX_SEED = 2**31 - 1  # jitted noise takes the seed as an int32
GIF_FRAME_MS = 125


class DemoInputError(ValueError):
    """A request the page cannot run (empty prompt, a size that was not compiled …); the message
    is shown in the page as is."""


@dataclasses.dataclass
class DemoModel:
    """A loaded pipeline and the controls the page offers for it.

    Attributes:
      name: label in the page (unique among the demo's models).
      pipeline: the loaded ``Pipeline``.
      steps: Euler step counts offered, the first being the default; ``(1,)`` is a one-step model
        (InstaFlow) and hides the steps control.
      guidance: default CFG scale, or None for a model without guidance (InstaFlow: CFG off, the
        guidance and negative-prompt controls hidden).
    """

    name: str
    pipeline: Pipeline
    steps: tuple[int, ...] = (1,)
    guidance: float | None = None

    @property
    def uses_steps(self) -> bool:
        return len(self.steps) > 1

    @property
    def uses_guidance(self) -> bool:
        return self.guidance is not None

    @property
    def native_size(self) -> tuple[int, int]:
        """(height, width) the UNet was trained at: ``unet sample_size × 8`` (512×512 for SD 1.5)."""
        return self.pipeline.native_size

    def guidance_values(self) -> tuple[float, ...]:
        """One scale per compiled CFG variant: off only, or off (g = 1) and on (g > 1)."""
        return (1.0, CFG_ON_SCALE) if self.uses_guidance else (0.0,)


@dataclasses.dataclass(frozen=True)
class CompileJob:
    """One program compiled at start-up: a model at a batch size, image size, steps and CFG."""

    model: str
    batch: int
    height: int
    width: int
    steps: int
    guidance: float

    def describe(self) -> str:
        guidance = "CFG on" if guidance_enabled(self.guidance) else "CFG off"
        images = f"{self.batch} image" + ("s" if self.batch > 1 else "")
        return f"{self.model} {self.height}×{self.width}, {self.steps} step(s), {guidance}, {images}"


def size_label(size: tuple[int, int]) -> str:
    """(height, width) → ``"HxW"``, the form sizes take on the command line and in the page."""
    return f"{size[0]}x{size[1]}"


def parse_size(text: str) -> tuple[int, int]:
    """``"512x512"`` (or ``"512×512"``, or ``"512"``) → (height, width), multiples of 8."""
    parts = str(text).lower().replace("×", "x").split("x")
    try:
        height, width = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (None, None)
    except ValueError:
        height = width = None
    if height is None or width is None or height <= 0 or width <= 0 or height % 8 or width % 8:
        raise ValueError(f"size {text!r} is impossible: give HxW in pixels, multiples of 8, e.g. 512x512.")
    return height, width


def parse_seed(seed: Any) -> int:
    """A whole number in [0, 2³¹ − 1] (the page's number boxes send floats or None)."""
    try:
        value = float(seed)
    except (TypeError, ValueError):
        value = float("nan")
    if not (np.isfinite(value) and value == int(value) and 0 <= value <= MAX_SEED):
        raise DemoInputError(f"The seed must be a whole number from 0 to {MAX_SEED}, got {seed!r}.")
    return int(value)


def format_timing(timings: Timings, steps: int, size: tuple[int, int]) -> str:
    """One Markdown line: time per image, the request, and whether compilation was included."""
    count = f"{timings.batch} image" + ("s" if timings.batch > 1 else "")
    text = (
        f"**{timings.per_image_s * 1000:.1f} ms per image** · {count} at {size[0]}×{size[1]}, "
        f"{steps} step{'s' if steps > 1 else ''}, {timings.run_s * 1000:.1f} ms in all · "
    )
    if timings.compile_s > 0:
        return text + f"**included {timings.compile_s:.1f} s of compilation** (not compiled at start-up)"
    return text + "no compilation (compiled at start-up)"


class DemoEngine:
    """The demo's models and the requests the page makes, one at a time (a lock per engine).

    Args:
      models: one or two ``DemoModel`` (the second is the few-step 2-RF of the side-by-side tab).
      sizes: (height, width) pairs offered; default: each model's native size.
      max_images: images per request offered, 1 to this (each count is compiled).
      errors: messages to show in the page (models that did not load).
      out_dir: where interpolation GIFs and strips are written (default: a new temp folder).
    """

    def __init__(
        self,
        models: Sequence[DemoModel],
        sizes: Sequence[tuple[int, int]] | None = None,
        max_images: int = 4,
        errors: Sequence[str] = (),
        out_dir: str | None = None,
    ) -> None:
        self.models = {model.name: model for model in models}
        if len(self.models) != len(models):
            raise ValueError(f"model names must differ, got {[m.name for m in models]}.")
        if max_images < 1:
            raise ValueError(f"max_images must be ≥ 1, got {max_images}.")
        natives = [model.native_size for model in models]
        self.sizes = list(dict.fromkeys(tuple(s) for s in (sizes or natives)))
        self.max_images = int(max_images)
        self.errors = list(errors)
        self.out_dir = out_dir or tempfile.mkdtemp(prefix="instaflow_demo_")
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return list(self.models)

    def compile_plan(self) -> list[CompileJob]:
        """Every program a request can need: models × sizes × batches × steps × CFG variants."""
        return [
            CompileJob(model.name, batch, height, width, steps, guidance)
            for model in self.models.values()
            for height, width in self.sizes
            for batch in range(1, self.max_images + 1)
            for steps in model.steps
            for guidance in model.guidance_values()
        ]

    def warm_up(self, log: Callable[[str], Any] = print) -> float:
        """Compile (and run once) every program of ``compile_plan``; returns the seconds spent."""
        plan = self.compile_plan()
        log(f"compiling {len(plan)} program(s) so that no request waits for a compile …")
        start = time.perf_counter()
        for i, job in enumerate(plan, 1):
            pipe = self.models[job.model].pipeline
            pipe.generate(
                ["warm-up"] * job.batch,
                num_steps=job.steps,
                guidance_scale=job.guidance,
                height=job.height,
                width=job.width,
            )
            log(f"[{i}/{len(plan)}] {job.describe()}: {pipe.last_timings.compile_s:.1f} s")
        total = time.perf_counter() - start
        log(f"ready: compiled in {total:.1f} s")
        return total

    # --- requests -------------------------------------------------------------------------------

    def check(
        self, name: str, prompt: str, seed: Any, steps: Any, size: Any, num_images: Any = 1
    ) -> tuple[DemoModel, str, int, int, tuple[int, int], int]:
        """Validate a request: (model, prompt, seed, steps, (height, width), count) or DemoInputError."""
        if name not in self.models:
            raise DemoInputError(f"Model {name!r} is not loaded; choose one of {self.names}.")
        model = self.models[name]
        prompt = (prompt or "").strip()
        if not prompt:
            raise DemoInputError(
                "The prompt is empty: type what the image should show, e.g. 'a photo of a cat'."
            )
        seed = parse_seed(seed)
        try:
            steps = int(steps) if steps not in (None, "") else model.steps[0]
            count = int(num_images) if num_images not in (None, "") else 1
        except (TypeError, ValueError):
            raise DemoInputError(
                f"Steps and images are whole numbers, got {steps!r} and {num_images!r}."
            ) from None
        if steps not in model.steps:
            raise DemoInputError(
                f"{steps} steps were not compiled for {name}; choose one of {list(model.steps)}."
            )
        try:
            size = parse_size(size) if isinstance(size, str) else tuple(size)
        except ValueError as err:
            raise DemoInputError(str(err)) from None
        if size not in self.sizes:
            offered = [size_label(s) for s in self.sizes]
            raise DemoInputError(f"Size {size_label(size)} was not compiled; choose one of {offered}.")
        if not 1 <= count <= self.max_images:
            raise DemoInputError(f"Number of images must be 1 to {self.max_images}, got {num_images!r}.")
        return model, prompt, seed, steps, size, count

    @staticmethod
    def _guidance(model: DemoModel, guidance: Any) -> float:
        if not model.uses_guidance:
            return 0.0
        try:
            value = model.guidance if guidance in (None, "") else float(guidance)
        except (TypeError, ValueError):
            value = float("nan")
        if not np.isfinite(value) or value < 0:
            raise DemoInputError(f"Guidance must be a number ≥ 0 (1 or less = off), got {guidance!r}.")
        return value

    def _run(self, model: DemoModel, prompts: list[str], **kwargs: Any) -> tuple[np.ndarray, Timings]:
        with self._lock:  # one request at a time on the device(s), whatever the web server does
            images = model.pipeline.generate(prompts, **kwargs)
            return images, model.pipeline.last_timings

    def generate(
        self,
        name: str,
        prompt: str,
        seed: Any = 0,
        num_images: Any = 1,
        steps: Any = None,
        guidance: Any = None,
        negative_prompt: str = "",
        size: Any = None,
    ) -> tuple[np.ndarray, str]:
        """Images float32 [N, H, W, 3] in [0, 1] (NHWC) for one prompt and its timing line.

        Sample i uses the noise of (seed, i), exactly as ``Pipeline.generate(prompts, seed=seed)``.
        """
        size = self.sizes[0] if size is None else size
        model, prompt, seed, steps, size, count = self.check(name, prompt, seed, steps, size, num_images)
        g = self._guidance(model, guidance)
        images, timings = self._run(
            model,
            [prompt] * count,
            num_steps=steps,
            guidance_scale=g,
            negative_prompt=negative_prompt or "",
            seed=seed,
            height=size[0],
            width=size[1],
        )
        return images, format_timing(timings, steps, size)

    def compare(
        self,
        prompt: str,
        seed: Any = 0,
        steps: Any = None,
        guidance: Any = None,
        negative_prompt: str = "",
        size: Any = None,
    ) -> tuple[tuple[np.ndarray, str], tuple[np.ndarray, str]]:
        """The first model at its default settings vs the second at ``steps``/``guidance``, on the
        same prompt and seed (hence the same noise): ((image [H, W, 3], timing), (image, timing))."""
        if len(self.models) < 2:
            raise DemoInputError("The side-by-side view needs two models: start the demo with --model2.")
        first, second = self.models.values()
        left, left_text = self.generate(first.name, prompt, seed, 1, first.steps[0], first.guidance, "", size)
        right, right_text = self.generate(
            second.name, prompt, seed, 1, steps, guidance, negative_prompt, size
        )
        return (left[0], left_text), (right[0], right_text)

    def interpolate(
        self,
        name: str,
        prompt: str,
        seed_a: Any = 0,
        seed_b: Any = 1,
        frames: Any = 8,
        steps: Any = None,
        guidance: Any = None,
        negative_prompt: str = "",
        size: Any = None,
    ) -> tuple[np.ndarray, str, str]:
        """A walk from seed A's noise to seed B's (slerp): (frames float32 [F, H, W, 3] in [0, 1],
        path of an animated GIF, timing line). Frame 0 is seed A's image, the last seed B's."""
        size = self.sizes[0] if size is None else size
        model, prompt, seed_a, steps, size, _ = self.check(name, prompt, seed_a, steps, size)
        seed_b = parse_seed(seed_b)
        count = int(frames) if frames not in (None, "") else 8
        if count < 2:
            raise DemoInputError(f"An interpolation needs at least 2 frames, got {frames!r}.")
        g = self._guidance(model, guidance)
        pipe = model.pipeline
        shape = latent_shape(1, size[0], size[1], pipe.latent_channels, pipe.vae_scale_factor)[1:]
        latents = interpolation_latents(seed_a, seed_b, shape, count)
        out, run_s, compile_s = [], 0.0, 0.0
        for start in range(0, count, self.max_images):  # batches that were compiled at start-up
            chunk = latents[start : start + self.max_images]
            images, timings = self._run(
                model,
                [prompt] * len(chunk),
                latents=chunk,
                num_steps=steps,
                guidance_scale=g,
                negative_prompt=negative_prompt or "",
                height=size[0],
                width=size[1],
            )
            out.append(images)
            run_s, compile_s = run_s + timings.run_s, compile_s + timings.compile_s
        walk = np.concatenate(out)
        stem = os.path.join(self.out_dir, f"walk_{seed_a}_{seed_b}_{time.time_ns()}")
        gif = save_gif(stem + ".gif", list(walk), GIF_FRAME_MS)
        return walk, gif, format_timing(Timings(compile_s, run_s, count), steps, size)


def model_name(path: str | Pipeline) -> str:
    """A short label: the folder's name (``instaflow-0.9B``), or the pipeline's source folder."""
    if isinstance(path, Pipeline):
        path = path.source or "model"
    return TINY_RANDOM if path == TINY_RANDOM else os.path.basename(str(path).rstrip("/\\")) or str(path)


def load_model(
    path: str | Pipeline, steps: Sequence[int], guidance: float | None, dtype: str = "auto"
) -> DemoModel:
    """A ``DemoModel`` from a folder, cached repo id, ``tiny-random`` or an already loaded Pipeline."""
    steps = tuple(int(s) for s in steps)
    if not steps or min(steps) < 1:
        raise ValueError(f"steps must be positive integers, got {list(steps)}.")
    if isinstance(path, Pipeline):
        pipe = path
    else:
        from instaflow_jax.pipeline import load_pipeline

        pipe = load_pipeline(resolve_model(path), dtype=resolve_dtype(dtype))
    return DemoModel(model_name(path), pipe, steps, guidance)


def load_engine(
    model: str | Pipeline,
    model2: str | Pipeline | None = None,
    *,
    steps: Sequence[int] = (1,),
    guidance: float | None = None,
    model2_steps: Sequence[int] = DEFAULT_MODEL2_STEPS,
    model2_guidance: float | None = DEFAULT_MODEL2_GUIDANCE,
    sizes: Sequence[tuple[int, int]] | None = None,
    max_images: int = 4,
    dtype: str = "auto",
) -> DemoEngine:
    """Load the demo's models; a model that does not load becomes a message in ``engine.errors``
    (shown in the page) instead of an exception. Call ``engine.warm_up()`` before serving."""
    models, errors = [], []
    for flag, path, model_steps, model_guidance in (
        ("--model", model, steps, guidance),
        ("--model2", model2, model2_steps, model2_guidance),
    ):
        if path is None:
            continue
        try:
            loaded = load_model(path, model_steps, model_guidance, dtype)
        except (*USER_ERRORS, OSError) as err:
            errors.append(f"{flag} {model_name(path)!r} did not load: {err}")
            continue
        if any(m.name == loaded.name for m in models):
            loaded.name += " (2)"
        models.append(loaded)
    return DemoEngine(models, sizes, max_images, errors)
