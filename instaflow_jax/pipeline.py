"""``Pipeline``: tokenizer + Flax UNet/VAE/text encoder + their params, loaded from a folder.

The pure functions in ``instaflow_jax.sampling`` do the work; this object only holds what they
need and offers conveniences on top of them.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from instaflow_jax.controlnet import ControlNet, control_inputs
from instaflow_jax.conventions import latent_shape, nchw_to_nhwc, nhwc_to_nchw
from instaflow_jax.models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel
from instaflow_jax.parallel import (
    batch_sharded,
    enable_compilation_cache,
    make_mesh,
    pad_batch,
    padded_size,
    replicated,
)
from instaflow_jax.sampling.noise import MAX_SEED, noise_for_indices
from instaflow_jax.sampling.text_to_image import (
    NonFiniteOutputError,
    SamplerSpec,
    describe_non_finite,
    encode_text,
    make_generate_fn,
    with_finite_flags,
)
from instaflow_jax.sampling.velocity import guidance_enabled
from instaflow_jax.text import tokenize
from instaflow_jax.weights.lora import merge_lora
from instaflow_jax.weights.pipeline_folder import load_pipeline_parts, save_pipeline_parts


class InsufficientMemoryError(MemoryError):
    """A generation that does not fit in the device's memory (estimated by XLA, or refused by it)."""


def available_memory_bytes(device: jax.Device) -> int | None:
    """Memory a program may use on ``device``: its allocator limit, or the host's available RAM."""
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


@dataclasses.dataclass
class Timings:
    """Seconds spent by the last ``generate`` call: compiling (0 when cached) and running."""

    compile_s: float = 0.0
    run_s: float = 0.0
    batch: int = 0

    @property
    def per_image_s(self) -> float:
        return self.run_s / max(self.batch, 1)


@dataclasses.dataclass
class Pipeline:
    """An SD 1.x-family pipeline (SD teacher, 2-Rectified Flow or InstaFlow one-step student).

    ``params`` maps ``"unet"``, ``"vae"`` and ``"text_encoder"`` to Flax param trees.
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: Any
    params: dict[str, Any]
    scheduler_config: dict[str, Any]
    source: str | None = None
    mesh: Mesh | None = None
    last_timings: Timings = dataclasses.field(default_factory=Timings)
    lora_skipped: list[str] = dataclasses.field(default_factory=list, repr=False)
    _compiled: dict = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.mesh = self.mesh or make_mesh()
        self.params = jax.device_put(self.params, replicated(self.mesh))

    @property
    def modules(self) -> dict[str, Any]:
        """The Flax modules by name (``unet``, ``vae``, ``text_encoder``), the keys of ``params``:
        with ``params`` the arguments of :func:`instaflow_jax.make_generate_fn`."""
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}

    @property
    def latent_scale(self) -> float:
        """VAE ``scaling_factor`` (0.18215 for SD 1.x): model latents = VAE latents × this."""
        return float(self.vae.config.scaling_factor)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along each side (8 for SD 1.x)."""
        return self.vae.config.downsample_factor

    @property
    def native_size(self) -> tuple[int, int]:
        """(height, width) the UNet was trained at: ``unet sample_size × vae_scale_factor``
        (512×512 for SD 1.5), the default size of ``generate``, as in diffusers."""
        side = int(self.unet.config.sample_size) * self.vae_scale_factor
        return side, side

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def max_length(self) -> int:
        return int(min(self.tokenizer.model_max_length, self.text_encoder.config.max_position_embeddings))

    def tokenize(self, prompts: str | Sequence[str]) -> np.ndarray:
        """Prompts → int32 token ids [B, 77], padded to ``max_length``."""
        return tokenize(self.tokenizer, prompts, self.max_length)

    def encode_prompt(self, prompts: str | Sequence[str]) -> jax.Array:
        """Prompts → float32 text context [B, 77, D] (CLIP last hidden state)."""
        return encode_text(self.text_encoder, self.params["text_encoder"], self.tokenize(prompts))

    def generate(
        self,
        prompts: str | Sequence[str],
        num_steps: int = 1,
        guidance_scale: float = 0.0,
        negative_prompt: str | Sequence[str] = "",
        seed: int = 0,
        latents: np.ndarray | None = None,
        height: int | None = None,
        width: int | None = None,
        solver: str = "euler",
        output_type: str = "image",
        controlnet: ControlNet | Sequence[ControlNet] | None = None,
        control_image: Any = None,
        controlnet_scale: float | Sequence[float] = 1.0,
    ) -> np.ndarray:
        """Text → images with the pipeline's UNet, compiled end to end.

        Args:
          prompts: one prompt or a list (the batch).
          num_steps: Euler steps (1 = InstaFlow one step; 25 for 2-RF quality) or, for
            ``solver="dpmpp2m"``, DPM-Solver++ steps of the SD teacher (25 in the paper).
          guidance_scale: CFG scale g; CFG runs only when g > 1 (InstaFlow: 0; 2-RF: 1.5; SD
            teacher: 5). Changing g among values > 1 never recompiles.
          negative_prompt: replaces "" as the unconditional prompt under CFG (one, or one per prompt).
          seed: sample i uses noise from ``fold_in(key(seed), i)``.
          latents: optional initial noise in the diffusers layout [B, 4, H/8, W/8] (NCHW) float32.
          height, width: image size in pixels, multiples of the VAE factor (8 for SD); default:
            the model's native size (:attr:`native_size`, 512×512 for SD 1.5).
          solver: ``"euler"`` (rectified flow) or ``"dpmpp2m"`` (SD teacher, ε-prediction).
          output_type: ``"image"`` → float32 [B, H, W, 3] in [0, 1]; ``"latent"`` → model-scale
            latents [B, 4, H/8, W/8] float32 (NCHW, diffusers layout).
          controlnet: a ControlNet from :func:`instaflow_jax.load_controlnet`, or a list of them
            (their residuals are summed).
          control_image: the condition image (one per ControlNet, in a list for several): uint8 or
            float in [0, 1], [H, W, 3] (used for every prompt) or [B, H, W, 3], NHWC, RGB, of the
            output size. A new image or scale never recompiles.
          controlnet_scale: residual scale, one or one per ControlNet.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("prompts is empty; give at least one prompt.")
        batch = len(prompts)
        height = self.native_size[0] if height is None else int(height)
        width = self.native_size[1] if width is None else int(width)
        if not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale}.")
        guidance = guidance_enabled(guidance_scale)
        spec = SamplerSpec(int(num_steps), solver, guidance, output_type)
        shape = latent_shape(batch, height, width, self.latent_channels, self.vae_scale_factor)
        z0 = self._initial_latents(latents, shape, seed)
        ids = self.tokenize(prompts)
        uncond_ids = self.tokenize(self._negatives(negative_prompt, batch)) if guidance else None
        padded = padded_size(batch, self.mesh)
        args = (
            self.params,
            pad_batch(ids, padded),
            None if uncond_ids is None else pad_batch(uncond_ids, padded),
            pad_batch(z0, padded),
            np.float32(guidance_scale),
        )
        nets: tuple = ()
        if controlnet is not None:
            nets, images, scales = control_inputs(
                controlnet, control_image, controlnet_scale, batch, height, width
            )
            control = {
                "params": tuple(jax.device_put(net.params, replicated(self.mesh)) for net in nets),
                "images": tuple(pad_batch(image, padded) for image in images),
                "scales": scales,
            }
            args = args + (control,)
        elif control_image is not None:
            raise ValueError(
                "control_image was given without a controlnet; pass controlnet=load_controlnet(...)."
            )
        try:
            compiled, compile_s = self._executable(spec, args, tuple(net.module for net in nets))
            self._check_memory(compiled, batch, height, width)
            start = time.perf_counter()
            out, finite = jax.device_get(compiled(*args))
        except jax.errors.JaxRuntimeError as err:
            if "RESOURCE_EXHAUSTED" not in str(err):
                raise
            found = str(err).split("\n", 1)[0]
            raise InsufficientMemoryError(self._memory_message(batch, height, width, found)) from None
        out = np.asarray(out)[:batch]
        self.last_timings = Timings(compile_s, time.perf_counter() - start, batch)
        if not np.all(finite[:batch]):
            bad = np.flatnonzero(~np.asarray(finite[:batch]))
            raise NonFiniteOutputError(describe_non_finite(bad, prompts, self.params, guidance_scale, spec))
        return nhwc_to_nchw(out) if output_type == "latent" else out

    def _memory_message(self, batch: int, height: int, width: int, found: str) -> str:
        native = "×".join(map(str, self.native_size))
        return (
            f"{batch} image(s) at {height}×{width} do not fit in memory ({found}); this model's "
            f"native size is {native}: ask for a smaller size or fewer images."
        )

    def _check_memory(self, compiled: Any, batch: int, height: int, width: int) -> None:
        """Refuse a program whose XLA memory estimate (outputs and temporaries: the params are
        resident already) exceeds what the first device has free."""
        try:
            stats = compiled.memory_analysis()
            need = stats.output_size_in_bytes + stats.temp_size_in_bytes
        except (AttributeError, NotImplementedError, jax.errors.JaxRuntimeError):
            return  # no estimate on this backend: XLA's own RESOURCE_EXHAUSTED is caught instead
        device = self.mesh.devices.flat[0]
        if device.platform == "cpu":  # CPU "devices" share the host's memory
            need *= self.mesh.devices.size
        free = available_memory_bytes(device)
        if free is not None and need > free:
            found = f"XLA estimates {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB are free"
            raise InsufficientMemoryError(self._memory_message(batch, height, width, found))

    def _initial_latents(self, latents: np.ndarray | None, shape: tuple[int, ...], seed: int) -> np.ndarray:
        if latents is None:
            if not 0 <= int(seed) <= MAX_SEED:
                raise ValueError(f"seed must lie in 0…{MAX_SEED} (a uint32 PRNG seed), got {seed}.")
            return np.asarray(noise_for_indices(seed, np.arange(shape[0]), shape[1:]))
        latents = np.asarray(latents, np.float32)
        expected = (shape[0], shape[3], shape[1], shape[2])
        if latents.shape != expected:
            raise ValueError(
                f"latents must be NCHW {expected} for {shape[0]} prompt(s) at this size, got {latents.shape}."
            )
        if not np.all(np.isfinite(latents)):
            bad = np.flatnonzero(~np.isfinite(latents.reshape(len(latents), -1)).all(axis=1))
            raise ValueError(f"latents contain NaN or infinity (samples {bad.tolist()}); pass finite noise.")
        return nchw_to_nhwc(latents)

    @staticmethod
    def _negatives(negative_prompt: str | Sequence[str], batch: int) -> list[str]:
        if isinstance(negative_prompt, str):
            return [negative_prompt] * batch
        negatives = list(negative_prompt)
        if len(negatives) != batch:
            raise ValueError(f"{len(negatives)} negative prompts for {batch} prompts; give one or one each.")
        return negatives

    def _executable(self, spec: SamplerSpec, args: tuple, controlnets: tuple = ()) -> tuple[Any, float]:
        """Compiled generate for this spec, these shapes and these ControlNet modules:
        (executable, compile seconds or 0)."""
        shapes = tuple(None if a is None else np.shape(a) for a in args[1:4])
        if controlnets:
            shapes += (tuple(np.shape(image) for image in args[5]["images"]),)
        key = (spec, shapes, controlnets)
        if key in self._compiled:
            return self._compiled[key], 0.0
        enable_compilation_cache()
        modules = self.modules
        if controlnets:
            modules["controlnets"] = controlnets
        fn = make_generate_fn(modules, spec, self.scheduler_config)
        data, rep = batch_sharded(self.mesh), replicated(self.mesh)
        shardings = (rep, data, None if args[2] is None else data, data, rep)
        if controlnets:
            shardings += ({"params": rep, "images": data, "scales": rep},)
        jitted = jax.jit(with_finite_flags(fn), in_shardings=shardings, out_shardings=(data, data))
        start = time.perf_counter()
        compiled = jitted.lower(*args).compile()
        self._compiled[key] = compiled
        return compiled, time.perf_counter() - start

    def with_lora(self, path: str, scale: float = 1.0, strict: bool = True) -> Pipeline:
        """A new pipeline whose UNet and text encoder have a LoRA file merged in; ``self`` is untouched.

        ``W + scale · (alpha / rank) · up @ down`` for every layer of the file (kohya/A1111,
        diffusers or PEFT ``.safetensors``, LoCon convolutions included; see
        :mod:`instaflow_jax.weights.lora`). Chain calls for several LoRAs, each with its own scale.
        Keys that match no layer raise ``LoRAError`` listing them, or are skipped (and listed in a
        warning and in ``lora_skipped``) with ``strict=False``; a LoRA for another architecture
        (SDXL, SD 2.x, Flux) is an error. The new pipeline shares the compiled programs (params
        are arguments of the compiled generate), so merging never recompiles.
        """
        params, skipped = merge_lora(self.params, path, scale, strict)
        merged = dataclasses.replace(self, params=params, last_timings=Timings())
        merged.lora_skipped = [*self.lora_skipped, *skipped]
        return merged

    def save_pretrained(self, folder: str, fmt: str = "safetensors", dtype: Any = None) -> None:
        """Write the diffusers folder layout (PyTorch-named safetensors by default).

        The folder loads with :func:`load_pipeline` and with PyTorch
        ``diffusers.StableDiffusionPipeline.from_pretrained``.
        """
        save_pipeline_parts(
            folder,
            self.modules,
            self.params,
            self.tokenizer,
            self.scheduler_config,
            fmt,
            dtype,
        )


def load_pipeline(
    path: str,
    dtype: Any = "float32",
    param_dtype: Any = "float32",
    variant: str | None = None,
    remat: bool = False,
    attention_impl: str | None = "auto",
    mesh: Mesh | None = None,
) -> Pipeline:
    """Load an SD 1.x-family diffusers folder (SD 1.5, InstaFlow-0.9B, 2-Rectified Flow …).

    Args:
      path: a local folder with ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/`` and
        ``tokenizer/``, or a Hugging Face repo id already in the local cache.
      dtype: compute dtype (``"bfloat16"`` on accelerators, ``"float32"`` for exact parity).
      param_dtype: dtype the parameters are stored in (``"float32"`` by default).
      variant: weights variant, e.g. ``"fp16"`` for ``*.fp16.safetensors``.
      remat: rematerialise UNet blocks in the backward pass (training; on CPU jit the step with
        ``compiler_options=parallel.remat_compiler_options(True)``).
      attention_impl: attention in all three networks: ``"auto"`` (default; ``None`` is the
        same), ``"xla"``, ``"blockwise"``, ``"cudnn"`` or ``"pallas_tpu"``
        (:mod:`instaflow_jax.models.attention`). ``"auto"`` runs the Pallas flash kernel on TPUs,
        cuDNN's fused attention on GPUs in float16/bfloat16, and otherwise blockwise attention
        for large score matrices and XLA's for small ones; an implementation that cannot serve a
        layer falls back with the reason logged.
      mesh: data-parallel mesh for ``generate`` (default: all local devices).
    """
    from instaflow_jax.models.attention import check_implementation

    attention_impl = check_implementation(attention_impl)
    parts = load_pipeline_parts(path, dtype, param_dtype, variant, remat=remat, attention_impl=attention_impl)
    modules = parts.modules
    return Pipeline(
        unet=modules["unet"],
        vae=modules["vae"],
        text_encoder=modules["text_encoder"],
        tokenizer=parts.tokenizer,
        params=parts.params,
        scheduler_config=parts.scheduler_config,
        source=parts.source,
        mesh=mesh,
    )
