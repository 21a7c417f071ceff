"""Model configs as frozen dataclasses, read from and written to diffusers ``config.json`` files.

Each config accepts the keys that the SD 1.x family uses. Keys that select a feature we do not
port (SDXL's ``addition_embed_type``, SD 2's ``use_linear_projection`` …) must hold their
diffusers default, otherwise loading fails with an error that names the key, the value found and
the model family it points to. Keys starting with ``_`` (``_class_name``, versions) and documented
no-op keys are ignored; any other unknown key (say from a newer library version) gives a warning.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, ClassVar

SD1_UNET_BLOCKS_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
SD1_UNET_BLOCKS_UP = ("CrossAttnUpBlock2D", "UpBlock2D")


class ConfigError(ValueError):
    """A config.json that does not describe an SD 1.x-family model we can run."""


def _tupled(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


@dataclasses.dataclass(frozen=True)
class _Config:
    # key -> (default value, what a non-default value means). Non-default values are rejected.
    FIXED: ClassVar[dict[str, tuple[Any, str]]] = {}
    # Keys that are accepted and ignored: they do not change the forward pass of these models.
    IGNORED: ClassVar[frozenset[str]] = frozenset()
    CLASS_NAMES: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> Any:
        """Validate a diffusers/transformers config dict and build the dataclass."""
        class_name = raw.get("_class_name") or (raw.get("architectures") or [None])[0]
        if class_name is not None and cls.CLASS_NAMES and class_name not in cls.CLASS_NAMES:
            raise ConfigError(
                f"{source}: expected a config of class {' or '.join(cls.CLASS_NAMES)}, found class "
                f"{class_name!r}. Point at the matching sub-folder of an SD 1.x pipeline."
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs, problems, unknown = {}, [], []
        for key, value in raw.items():
            if key.startswith("_") or key in cls.IGNORED:
                continue
            if key in fields:
                kwargs[key] = _tupled(value)
            elif key in cls.FIXED:
                default, meaning = cls.FIXED[key]
                if _tupled(value) != default and not (isinstance(default, (int, float)) and value == default):
                    problems.append(f"{key}={value!r} (expected {default!r}; {meaning})")
            else:
                unknown.append(key)
        if problems:
            raise ConfigError(
                f"{source} is not an SD 1.x-family {cls.__name__[:-6]}: "
                + "; ".join(problems)
                + ". Only SD 1.x-style models (SD 1.4/1.5, InstaFlow, 2-Rectified Flow and their "
                "fine-tunes) are supported."
            )
        if unknown:
            warnings.warn(
                f"{source}: ignoring config keys unknown to {cls.__name__}: {sorted(unknown)}. "
                "If the model does not behave like SD 1.x, this is why.",
                stacklevel=2,
            )
        config = cls(**kwargs)
        config.validate(source)
        return config

    def validate(self, source: str) -> None:  # overridden
        del source

    def to_dict(self) -> dict[str, Any]:
        """The diffusers/transformers ``config.json`` content (lists, not tuples)."""
        out = {"_class_name": self.CLASS_NAMES[0]} if self.CLASS_NAMES else {}
        for key, value in dataclasses.asdict(self).items():
            out[key] = list(value) if isinstance(value, tuple) else value
        return out


@dataclasses.dataclass(frozen=True)
class UNetConfig(_Config):
    """``UNet2DConditionModel`` of the SD 1.x family (any widths, depths and head counts)."""

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    up_block_types: tuple[str, ...] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    )
    layers_per_block: int = 2
    attention_head_dim: int | tuple[int, ...] = 8  # diffusers' name: the number of heads in SD 1.x
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0

    CLASS_NAMES: ClassVar[tuple[str, ...]] = ("UNet2DConditionModel",)
    IGNORED: ClassVar[frozenset[str]] = frozenset({"dropout"})  # no dropout in inference/fine-tuning
    FIXED: ClassVar[dict[str, tuple[Any, str]]] = {
        "act_fn": ("silu", "another activation"),
        "center_input_sample": (False, "an input-centring variant"),
        "downsample_padding": (1, "another downsampler"),
        "mid_block_scale_factor": (1, "a rescaled mid block"),
        "mid_block_type": ("UNetMidBlock2DCrossAttn", "another mid block"),
        "dual_cross_attention": (False, "dual cross-attention"),
        "use_linear_projection": (False, "linear transformer projections, as in SD 2.x"),
        "upcast_attention": (False, "upcast attention, as in SD 2.1"),
        "only_cross_attention": (False, "cross-attention-only blocks"),
        "class_embed_type": (None, "class embeddings, as in unCLIP/upscalers"),
        "addition_embed_type": (None, "added text/time embeddings, as in SDXL"),
        "addition_time_embed_dim": (None, "added time embeddings, as in SDXL"),
        "addition_embed_type_num_heads": (64, "added embeddings"),
        "projection_class_embeddings_input_dim": (None, "class embeddings, as in SDXL"),
        "num_class_embeds": (None, "class embeddings"),
        "class_embeddings_concat": (False, "class embeddings"),
        "encoder_hid_dim": (None, "an encoder projection, as in IF/Kandinsky"),
        "encoder_hid_dim_type": (None, "an encoder projection"),
        "transformer_layers_per_block": (1, "several transformer layers per block, as in SDXL"),
        "reverse_transformer_layers_per_block": (None, "several transformer layers per block"),
        "num_attention_heads": (None, "explicit head counts, as in newer models"),
        "resnet_time_scale_shift": ("default", "scale-shift time conditioning"),
        "resnet_skip_time_act": (False, "another resnet variant"),
        "resnet_out_scale_factor": (1.0, "rescaled resnets"),
        "time_embedding_type": ("positional", "Fourier time embeddings"),
        "time_embedding_dim": (None, "a custom time-embedding width"),
        "time_embedding_act_fn": (None, "a time-embedding activation"),
        "timestep_post_act": (None, "a post-activation on the time embedding"),
        "time_cond_proj_dim": (None, "a guidance embedding, as in LCM"),
        "conv_in_kernel": (3, "another input convolution"),
        "conv_out_kernel": (3, "another output convolution"),
        "cross_attention_norm": (None, "normalised cross-attention"),
        "attention_type": ("default", "gated attention, as in GLIGEN"),
        "mid_block_only_cross_attention": (None, "cross-attention-only mid block"),
        "attention_bias": (False, "biased q/k/v projections"),
    }

    @property
    def num_heads(self) -> tuple[int, ...]:
        """Attention heads per down block (diffusers stores them as ``attention_head_dim``)."""
        heads = self.attention_head_dim
        return tuple(heads) if isinstance(heads, tuple) else (heads,) * len(self.block_out_channels)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    def validate(self, source: str) -> None:
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ConfigError(
                f"{source}: block_out_channels has {n} entries but down_block_types has "
                f"{len(self.down_block_types)} and up_block_types {len(self.up_block_types)}."
            )
        for kind, allowed in (("down", SD1_UNET_BLOCKS_DOWN), ("up", SD1_UNET_BLOCKS_UP)):
            for block in getattr(self, f"{kind}_block_types"):
                if block not in allowed:
                    raise ConfigError(
                        f"{source}: {kind} block type {block!r} is not an SD 1.x block; "
                        f"expected one of {allowed}."
                    )
        if len(self.num_heads) != n:
            raise ConfigError(f"{source}: attention_head_dim needs {n} entries, got {self.num_heads}.")
        for width, heads in zip(self.block_out_channels, self.num_heads):
            if width % heads or width % self.norm_num_groups:
                raise ConfigError(
                    f"{source}: block width {width} must be divisible by its head count {heads} "
                    f"and by norm_num_groups={self.norm_num_groups}."
                )


@dataclasses.dataclass(frozen=True)
class VAEConfig(_Config):
    """``AutoencoderKL`` of SD 1.x (KL-f8)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 512
    scaling_factor: float = 0.18215

    CLASS_NAMES: ClassVar[tuple[str, ...]] = ("AutoencoderKL",)
    IGNORED: ClassVar[frozenset[str]] = frozenset({"force_upcast"})  # a fp16 hint for PyTorch
    FIXED: ClassVar[dict[str, tuple[Any, str]]] = {
        "act_fn": ("silu", "another activation"),
        "use_quant_conv": (True, "a VAE without quant_conv"),
        "use_post_quant_conv": (True, "a VAE without post_quant_conv"),
        "mid_block_add_attention": (True, "a VAE without mid-block attention"),
        "shift_factor": (None, "a shifted latent space, as in SD3/Flux"),
        "latents_mean": (None, "per-channel latent statistics"),
        "latents_std": (None, "per-channel latent statistics"),
    }

    def validate(self, source: str) -> None:
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ConfigError(f"{source}: block type lists must have {n} entries each.")
        if set(self.down_block_types) != {"DownEncoderBlock2D"} or set(self.up_block_types) != {
            "UpDecoderBlock2D"
        }:
            raise ConfigError(
                f"{source}: expected DownEncoderBlock2D/UpDecoderBlock2D blocks, found "
                f"{self.down_block_types} / {self.up_block_types}."
            )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(_Config):
    """transformers ``CLIPTextModel`` (the SD 1.x text encoder is CLIP ViT-L/14's)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 0
    eos_token_id: int = 2
    pad_token_id: int = 1
    projection_dim: int = 768

    CLASS_NAMES: ClassVar[tuple[str, ...]] = ("CLIPTextModel",)
    CAUSAL_ATTENTION: ClassVar[bool] = True  # the encoder layers (clip_text.py) read this
    IGNORED: ClassVar[frozenset[str]] = frozenset(
        {
            "architectures",
            "attention_dropout",
            "dropout",
            "initializer_factor",
            "initializer_range",
            "model_type",
            "torch_dtype",
            "dtype",
            "transformers_version",
            "output_attentions",
            "output_hidden_states",
            "return_dict",
            "use_cache",
            "id2label",
            "label2id",
            "tie_word_embeddings",
            "is_encoder_decoder",
            "chunk_size_feed_forward",
            "add_cross_attention",
            "tf_legacy_loss",
            "pruned_heads",
            "problem_type",
            "_name_or_path",
        }
    )

    def validate(self, source: str) -> None:
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise ConfigError(f"{source}: hidden_act {self.hidden_act!r}; expected quick_gelu or gelu.")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"{source}: hidden_size not divisible by num_attention_heads.")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(architectures=["CLIPTextModel"], model_type="clip_text_model")
        return out


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig(_Config):
    """transformers ``CLIPVisionModel``: a ViT whose encoder layers are the text encoder's, without
    the causal mask. Defaults are transformers' (ViT-B/32); ViT-L/14 and ViT-g/14 set them all."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512

    CLASS_NAMES: ClassVar[tuple[str, ...]] = ("CLIPVisionModel", "CLIPVisionModelWithProjection")
    CAUSAL_ATTENTION: ClassVar[bool] = False
    IGNORED: ClassVar[frozenset[str]] = CLIPTextConfig.IGNORED

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def validate(self, source: str) -> None:
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise ConfigError(f"{source}: hidden_act {self.hidden_act!r}; expected quick_gelu or gelu.")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"{source}: hidden_size not divisible by num_attention_heads.")
        if not isinstance(self.image_size, int) or not isinstance(self.patch_size, int):
            raise ConfigError(
                f"{source}: image_size {self.image_size!r} and patch_size {self.patch_size!r} must be "
                "single integers (square images and patches)."
            )
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"{source}: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}."
            )
