"""Tiny random SD 1.x-shaped pipelines in the real diffusers layout, and ``tiny-random``.

``make_tiny_pipeline(folder)`` writes configs, PyTorch-named safetensors and CLIP tokenizer
files (a small byte-level BPE vocabulary) without torch and without network. The networks have
the SD 1.x structure (cross-attention UNet, KL-f8 VAE with 4 levels, causal CLIP text encoder)
at a few thousand times less compute. ``resolve_model("tiny-random")`` is the offline smoke-test
pipeline every command accepts, made once per user (:func:`tiny_random_folder`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from instaflow_jax.models import (
    AutoencoderKL,
    CLIPTextConfig,
    CLIPTextModel,
    UNet2DConditionModel,
    UNetConfig,
    VAEConfig,
)
from instaflow_jax.weights.convert import unflatten
from instaflow_jax.weights.folder import SPECS
from instaflow_jax.weights.pipeline_folder import (
    DEFAULT_SCHEDULER_CONFIG,
    save_pipeline_parts,
)

TINY_RANDOM = "tiny-random"  # the model name of the per-user random tiny pipeline

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
TINY_WORDS = (
    "a photo of an the cat dog red blue green yellow circle square triangle small large big top",
    "bottom left right center at on in with painting astronaut horse riding",
)


def tiny_unet_config(**overrides: Any) -> UNetConfig:
    """Two levels (32, 64 channels), one cross-attention level, 32-wide text context."""
    base = dict(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4,
        cross_attention_dim=32,
        norm_num_groups=8,
    )
    base.update(overrides)
    return UNetConfig(**base)


def tiny_vae_config(**overrides: Any) -> VAEConfig:
    """Four levels (downsampling ×8 like SD) of 8–16 channels."""
    base = dict(
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=64,
    )
    base.update(overrides)
    return VAEConfig(**base)


def tiny_clip_config(vocab_size: int, **overrides: Any) -> CLIPTextConfig:
    base = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    base.update(overrides)
    return CLIPTextConfig(**base)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte → printable unicode character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def write_tiny_tokenizer(folder: str, words: tuple[str, ...] = TINY_WORDS, max_length: int = 77) -> int:
    """Write a CLIP BPE tokenizer (vocab.json, merges.txt, configs); returns its vocab size.

    Every byte is a token (alone and word-final with ``</w>``), and each word of ``words`` is
    merged left to right into a single token, so tiny prompts stay short.
    """
    os.makedirs(folder, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(token, len(vocab))
    merges: list[str] = []
    for word in " ".join(words).split():
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merge = f"{pieces[0]} {pieces[1]}"
            if merge not in merges:
                merges.append(merge)
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": EOS,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}
    with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f, indent=2)
    return len(vocab)


def random_params(module: Any, kind: str, seed: int, noise: float = 0.05) -> dict:
    """Random float32 numpy params with the component's exact tree (no init compile needed).

    Kernels ~ N(0, 1/fan_in), embeddings ~ N(0, 0.02²), norm scales 1 + ``noise``·N(0, 1) and
    biases ``noise``·N(0, 1), so no parameter is trivially 0 or 1.
    """
    rng = np.random.default_rng(seed)
    flat = {}
    for path, leaf in sorted(SPECS[kind].expected_shapes(module).items()):
        shape, name = tuple(leaf.shape), path[-1]
        if name == "kernel":
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
        elif name == "embedding":
            value = 0.02 * rng.standard_normal(shape)
        elif name == "scale":
            value = 1.0 + noise * rng.standard_normal(shape)
        else:
            value = noise * rng.standard_normal(shape)
        flat[path] = value.astype(np.float32)
    return unflatten(flat)


def make_tiny_pipeline(
    folder: str,
    seed: int = 0,
    unet_config: UNetConfig | None = None,
    vae_config: VAEConfig | None = None,
    fmt: str = "safetensors",
) -> str:
    """Write a complete random tiny SD 1.x-layout pipeline to ``folder``; returns ``folder``.

    Loads with ``instaflow_jax.load_pipeline`` and with PyTorch ``diffusers``.
    """
    from instaflow_jax.text import load_tokenizer

    vocab_size = write_tiny_tokenizer(os.path.join(folder, "tokenizer"))
    modules = {
        "unet": UNet2DConditionModel(unet_config or tiny_unet_config()),
        "vae": AutoencoderKL(vae_config or tiny_vae_config()),
        "text_encoder": CLIPTextModel(tiny_clip_config(vocab_size)),
    }
    params = {name: random_params(module, name, seed + i) for i, (name, module) in enumerate(modules.items())}
    tokenizer = load_tokenizer(os.path.join(folder, "tokenizer"))
    save_pipeline_parts(folder, modules, params, tokenizer, dict(DEFAULT_SCHEDULER_CONFIG), fmt)
    return folder


def user_cache_dir() -> str:
    """``$XDG_CACHE_HOME/instaflow_jax``, or ``~/.cache/instaflow_jax``: this user's cache folder."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "instaflow_jax")


def tiny_random_folder(cache_dir: str | None = None) -> str:
    """The ``tiny-random`` pipeline (``make_tiny_pipeline(seed=0)``) in ``cache_dir/tiny_random``.

    Made once per user (``cache_dir`` defaults to :func:`user_cache_dir`) under a file lock, in a
    temporary folder renamed into place, so concurrent jobs never see a half-written pipeline;
    remade when this module's source changes (its sha256 is kept in ``.source``).
    """
    import fcntl
    import hashlib
    import shutil
    import tempfile

    cache_dir = cache_dir or user_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    folder = os.path.join(cache_dir, "tiny_random")
    with open(__file__, "rb") as f:
        source = hashlib.sha256(f.read()).hexdigest()
    stamp = os.path.join(folder, ".source")
    with open(os.path.join(cache_dir, "tiny_random.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        try:
            with open(stamp) as f:
                if f.read() == source:
                    return folder
        except OSError:
            pass
        staging = tempfile.mkdtemp(prefix="tiny_random.", dir=cache_dir)
        try:
            make_tiny_pipeline(staging, seed=0)
            with open(os.path.join(staging, ".source"), "w") as f:
                f.write(source)
            if os.path.exists(folder):  # stale (older source) or left half-written by an old version
                shutil.rmtree(folder)
            os.rename(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def resolve_model(path: str) -> str:
    """``tiny-random`` → the per-user cached random tiny pipeline; anything else unchanged."""
    return tiny_random_folder() if path == TINY_RANDOM else path
