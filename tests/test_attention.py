"""Attention implementations against XLA's materialised reference, the "auto" rules, the logged
choices and fallbacks, memory that stays linear, and the option in the CLI and training config.

Shapes use the SD 1.5 head sizes (8 heads of 40 in the UNet's first level, the VAE's single head of
512, CLIP's causal 77 tokens, 77 text keys in cross-attention); block sizes are set small where a
shape would otherwise fit in one tile, so the online softmax, padding and masking all run.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instaflow_jax.models import attention
from instaflow_jax.models.attention import AttentionCall, dot_product_attention, select_implementation
from instaflow_jax.models.attention_blockwise import blockwise_attention

from conftest import assert_close

TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}  # of the reference's max |value|
# name: (q shape, k/v shape, causal, block_q, block_k)
CASES = {
    "self-256-8x40": ((2, 256, 8, 40), (2, 256, 8, 40), False, 64, 96),  # 96 ∤ 256: padded keys
    "cross-77-keys": ((2, 200, 8, 40), (2, 77, 8, 40), False, 128, 32),  # 128 ∤ 200: padded queries
    "vae-1x512": ((1, 256, 1, 512), (1, 256, 1, 512), False, 128, 96),
    "clip-causal-77": ((2, 77, 12, 64), (2, 77, 12, 64), True, 32, 32),
}
BF16_CASES = ("self-256-8x40", "cross-77-keys", "vae-1x512")  # the shapes (causal: float32)


def _inputs(q_shape, kv_shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    shapes = (q_shape, kv_shape, kv_shape, q_shape)
    return tuple(jnp.asarray(rng.standard_normal(shape), dtype) for shape in shapes)


def _check_against_xla(fn, case, dtype, what, heads=None):
    """Output and (dq, dk, dv) for a random cotangent, ``fn`` and the XLA reference in one program
    (``heads`` overrides the case's head count, batch 1)."""
    q_shape, kv_shape, causal, _, _ = CASES[case]
    if heads is not None:
        q_shape, kv_shape = (1, q_shape[1], heads, q_shape[3]), (1, kv_shape[1], heads, kv_shape[3])
    q, k, v, d_out = _inputs(q_shape, kv_shape, dtype)
    reference = lambda q, k, v: attention.xla_attention(q, k, v, is_causal=causal)

    def both(q, k, v, d_out):
        results = []
        for f in (fn, reference):
            out, pullback = jax.vjp(f, q, k, v)
            results.append((out, pullback(d_out)))
        return results

    (out, grads), (ref_out, ref_grads) = jax.jit(both)(q, k, v, d_out)
    assert out.dtype == ref_out.dtype == jnp.dtype(dtype)
    assert_close(out, ref_out, TOLERANCE[dtype], f"{what} {case} {dtype}: output")
    for name, g, g_ref in zip("qkv", grads, ref_grads):
        assert g.dtype == jnp.dtype(dtype)
        assert_close(g, g_ref, TOLERANCE[dtype], f"{what} {case} {dtype}: d{name}")


@pytest.mark.parametrize(
    "case, dtype", [(c, "float32") for c in CASES] + [(c, "bfloat16") for c in BF16_CASES]
)
def test_blockwise_equals_xla_in_output_and_gradients(case, dtype):
    _, _, causal, block_q, block_k = CASES[case]
    fn = lambda q, k, v: blockwise_attention(q, k, v, is_causal=causal, block_q=block_q, block_k=block_k)
    _check_against_xla(fn, case, dtype, "blockwise")


@pytest.mark.parametrize(
    "case, dtype",
    [
        ("self-256-8x40", "float32"),
        ("cross-77-keys", "bfloat16"),
        ("vae-1x512", "bfloat16"),
        ("clip-causal-77", "float32"),
    ],
)
def test_pallas_tpu_kernel_in_interpret_mode_equals_xla(case, dtype):
    """The shipped TPU kernel, run on CPU by Pallas' TPU interpreter, through the dispatcher and
    our padding (head size 40 → 128, 77 keys → 128 with masked segment ids, 200 queries → 256).
    Every shape and both dtypes are covered, not every pair, and two heads of each size instead
    of 8 or 12: the interpreter takes seconds per program."""
    from jax.experimental.pallas import tpu as pltpu

    causal = CASES[case][2]
    fn = lambda q, k, v: dot_product_attention(
        q, k, v, is_causal=causal, implementation="pallas_tpu", platform="tpu"
    )
    with pltpu.force_tpu_interpret_mode():
        _check_against_xla(fn, case, dtype, "pallas_tpu", heads=2)


# ------------------------------------------------------------------------------- "auto" rules


def _call(q_len, kv_len, heads, head_dim, dtype, batch=1, causal=False) -> AttentionCall:
    return AttentionCall(batch, q_len, kv_len, heads, head_dim, head_dim, dtype, causal)


UNET_SELF = _call(4096, 4096, 8, 40, "bfloat16")  # SD 1.5 at 512², first level
UNET_CROSS = _call(4096, 77, 8, 40, "bfloat16")
UNET_DEEP = _call(256, 256, 8, 160, "bfloat16")  # third level: heads of 160
VAE_MID = _call(4096, 4096, 1, 512, "bfloat16")
CLIP = _call(77, 77, 12, 64, "float32", causal=True)


def _f32(call: AttentionCall) -> AttentionCall:
    return AttentionCall(**{**call.__dict__, "dtype": "float32"})


@pytest.mark.parametrize(
    "requested, call, platform, expected, fallback",
    [
        ("auto", UNET_SELF, "tpu", "pallas_tpu", False),
        ("auto", VAE_MID, "tpu", "pallas_tpu", False),  # the kernel pads nothing here: 512 = 4·128
        ("auto", _f32(UNET_SELF), "tpu", "pallas_tpu", False),
        ("auto", UNET_SELF, "gpu", "cudnn", False),
        ("auto", UNET_DEEP, "gpu", "cudnn", False),
        ("auto", _call(4096, 4096, 8, 40, "float16"), "gpu", "cudnn", False),
        ("auto", VAE_MID, "gpu", "blockwise", True),  # cuDNN takes no 512-wide head
        ("auto", _f32(UNET_SELF), "gpu", "blockwise", False),  # float32: the size rule
        ("auto", _f32(UNET_CROSS), "gpu", "xla", False),
        ("auto", _f32(UNET_SELF), "cpu", "blockwise", False),
        ("auto", _f32(VAE_MID), "cpu", "blockwise", False),
        ("auto", _f32(UNET_CROSS), "cpu", "xla", False),  # 9.6 MiB of scores
        ("auto", _call(1024, 1024, 8, 80, "float32"), "cpu", "blockwise", False),  # 32 MiB
        ("auto", CLIP, "cpu", "xla", False),
        ("auto", _f32(UNET_SELF), "METAL", "blockwise", False),
        (None, _f32(UNET_SELF), "cpu", "blockwise", False),  # None means auto
        ("xla", UNET_SELF, "tpu", "xla", False),
        ("blockwise", UNET_SELF, "gpu", "blockwise", False),
        ("cudnn", _f32(UNET_SELF), "cpu", "blockwise", True),
        ("cudnn", _f32(UNET_CROSS), "gpu", "xla", True),  # float32 on a GPU
        ("cudnn", _call(4096, 4096, 8, 36, "bfloat16"), "gpu", "blockwise", True),  # 36 % 8 ≠ 0
        ("pallas_tpu", UNET_SELF, "gpu", "blockwise", True),
        ("pallas_tpu", CLIP, "tpu", "pallas_tpu", False),
    ],
)
def test_auto_rules_with_faked_platform_and_dtype(requested, call, platform, expected, fallback):
    choice = select_implementation(requested, call, platform)
    assert (choice.implementation, choice.fallback) == (expected, fallback), choice
    assert choice.reason


@pytest.mark.parametrize("platform, limit", [("cpu", 16 * 2**20), ("gpu", 64 * 2**20), ("METAL", 64 * 2**20)])
def test_size_rule_threshold_is_on_the_float32_score_matrix(platform, limit):
    """16 MiB of float32 scores (B·N·Tq·Tk·4 bytes) on CPU, 64 MiB elsewhere, whatever the dtype."""
    rows = limit // 4 // 1024
    below, at = (AttentionCall(1, n, 1024, 1, 64, 64, "float32") for n in (rows - 1, rows))
    assert select_implementation("auto", below, platform).implementation == "xla"
    assert select_implementation("auto", at, platform).implementation == "blockwise"


def test_unknown_implementation_and_bad_shapes_are_clear_errors():
    q = jnp.zeros((1, 8, 2, 4))
    with pytest.raises(ValueError, match=r"unknown attention implementation 'flash'.*auto, xla, blockwise"):
        dot_product_attention(q, q, q, implementation="flash")
    with pytest.raises(ValueError, match=r"q \[B, Tq, N, H\]"):
        dot_product_attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="batch and heads must match"):
        dot_product_attention(q, jnp.zeros((1, 8, 3, 4)), jnp.zeros((1, 8, 3, 4)))


# ------------------------------------------------------------------------------- logging, fallbacks


def test_choice_is_logged_once_per_signature_and_fallbacks_say_why(caplog):
    q, k, v, _ = _inputs((1, 24, 2, 8), (1, 24, 2, 8), "float32", seed=3)
    ref = attention.xla_attention(q, k, v)
    attention._LOGGED.clear()
    with caplog.at_level(logging.INFO, logger="instaflow_jax.models.attention"):
        for _ in range(2):  # two traces of the same signature: one line
            jax.jit(lambda q, k, v: dot_product_attention(q, k, v)).lower(q, k, v)
        assert_close(dot_product_attention(q, k, v), ref, 1e-6, "auto")
        infos = [r for r in caplog.records if r.levelno == logging.INFO]
        assert len(infos) == 1 and "'auto' → 'xla'" in infos[0].getMessage()
        # Asked for cuDNN on a CPU: served by the size rule, with the reason, as a warning.
        out = dot_product_attention(q, k, v, implementation="cudnn")
        assert_close(out, ref, 1e-6, "cudnn fallback")
        # A platform claiming a GPU: cuDNN is chosen, jax refuses it while tracing, we fall back.
        qh, kh, vh = (x.astype(jnp.bfloat16) for x in (q, k, v))
        out = dot_product_attention(qh, kh, vh, implementation="cudnn", platform="gpu")
        assert_close(out, attention.xla_attention(qh, kh, vh), 2e-2, "cudnn failure fallback")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert "'cudnn' → 'xla'" in warnings[0] and "needs an NVIDIA GPU" in warnings[0]
    assert "cudnn failed" in warnings[1]


# ------------------------------------------------------------------------------- memory, transforms


def test_blockwise_memory_is_linear_in_sequence_length():
    """XLA's own accounting of the compiled forward + backward (nothing is allocated): the
    reference holds [1, 8, 4096, 4096] float32 scores (512 MiB), blockwise a few tiles."""
    spec = jax.ShapeDtypeStruct((1, 4096, 8, 40), jnp.float32)

    def temp_bytes(fn):
        loss = lambda q, k, v: jnp.sum(fn(q, k, v) ** 2)
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(spec, spec, spec).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    scores = 4 * 8 * 4096 * 4096
    assert temp_bytes(attention.xla_attention) >= scores
    assert temp_bytes(blockwise_attention) < scores / 8


def test_blockwise_composes_with_vmap():
    q, k, v, _ = _inputs((2, 1, 24, 2, 8), (2, 1, 24, 2, 8), "float32", seed=1)
    fn = lambda q, k, v: blockwise_attention(q, k, v, block_q=8, block_k=16)
    batched = jax.jit(jax.vmap(fn))(q, k, v)
    for i in range(2):
        assert_close(batched[i], attention.xla_attention(q[i], k[i], v[i]), 1e-5, f"vmap row {i}")


# ------------------------------------------------------------------------------- CLI, training


def test_generate_cli_attention_flag(tiny_pipeline_dir, tmp_path):
    """``instaflow-generate --attention blockwise`` on the tiny pipeline equals the InstaFlow
    reference loop run with the PyTorch modules on the same noise (to PNG precision)."""
    from diffusers import StableDiffusionPipeline
    from PIL import Image
    from test_sampling import torch_euler

    from instaflow_jax.cli import generate as generate_cli
    from instaflow_jax.conventions import nhwc_to_nchw
    from instaflow_jax.sampling.noise import noise_for_indices

    argv = ["--attention", "blockwise", "--model", tiny_pipeline_dir, "--prompt", "a cat"]
    argv += ["--num-images", "1", "--height", "64", "--width", "64"]
    argv += ["--out", str(tmp_path / "g.png"), "--out-dir", str(tmp_path)]
    assert generate_cli.main(argv) == 0
    noise = nhwc_to_nchw(np.asarray(noise_for_indices(0, np.arange(1), (8, 8, 4))))  # the CLI's seed 0
    torch_pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    _, expected = torch_euler(torch_pipe, ["a cat"], np.ascontiguousarray(noise), 1, 0.0, "")
    saved = np.asarray(Image.open(tmp_path / "0000.png"), np.float32) / 255.0
    np.testing.assert_allclose(saved, expected[0], atol=1 / 255 + 1e-4)


def test_training_config_option_reaches_the_models(tiny_pipeline_dir):
    from instaflow_jax.train.config import TrainConfig
    from instaflow_jax.train.trainer import _models

    cfg = TrainConfig.from_config({"init_from": tiny_pipeline_dir, "attention": "blockwise"})
    modules = _models(cfg).modules
    assert {name: m.attention_impl for name, m in modules.items()} == {
        "unet": "blockwise",
        "vae": "blockwise",
        "text_encoder": "blockwise",
    }
    with pytest.raises(ValueError, match="attention 'flash'"):
        TrainConfig.from_config({"init_from": tiny_pipeline_dir, "attention": "flash"})
