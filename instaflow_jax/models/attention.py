"""The one attention op of the UNet, the VAE and the text encoder, with named implementations.

``dot_product_attention(q, k, v, is_causal=..., implementation=...)`` computes
``softmax(q kᵀ / √H) v`` on [B, T, N, H] tensors with one of:

- ``"xla"``: ``jax.nn.dot_product_attention(implementation="xla")``, which materialises the
  [B, N, Tq, Tk] score matrix: the reference;
- ``"blockwise"``: pure JAX, any backend and dtype, memory linear in the sequence lengths
  (:mod:`instaflow_jax.models.attention_blockwise`);
- ``"cudnn"``: cuDNN's fused flash attention through ``jax.nn.dot_product_attention``
  (NVIDIA GPUs, float16/bfloat16, head size a multiple of 8 and ≤ 128, ≤ 256 on Hopper);
- ``"pallas_tpu"``: the Pallas TPU flash-attention kernel shipped in
  ``jax.experimental.pallas.ops.tpu``, head size and sequences zero-padded to multiples of 128;
- ``"auto"`` (default): TPU → ``pallas_tpu``; GPU in float16/bfloat16 → ``cudnn``; otherwise
  ``blockwise`` when the float32 score matrix would reach ``BLOCKWISE_MIN_SCORE_BYTES`` (16 MiB
  on CPU, where the benchmark shows blockwise 1.4-3.5× faster than XLA on the SD layers above it
  and within milliseconds below; 64 MiB elsewhere), else ``xla``.

Note that ``jax.nn.dot_product_attention(implementation=None)`` is *not* "auto": in the jax we
use it is XLA's materialised attention on every platform, GPUs included.

The choice is made while tracing (the platform is ``jax.default_backend()``), so it is fixed per
compiled program, and logged once per distinct call signature (logger
``instaflow_jax.models.attention``, INFO). An implementation that cannot serve a call falls back
to the size rule above with the reason logged (WARNING when it was asked for explicitly), never
silently wrong.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from instaflow_jax.models.attention_blockwise import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q, blockwise_attention

log = logging.getLogger(__name__)

IMPLEMENTATIONS = ("auto", "xla", "blockwise", "cudnn", "pallas_tpu")
# Float32 score-matrix size (B·N·Tq·Tk·4 bytes) from which "auto" takes blockwise over xla, per
# platform. On CPU (benchmarks/RESULTS.md) blockwise is 1.4-3.5× faster than XLA on the SD 1.5
# layers from 32 MiB up (the UNet's 1024- and 4096-token self-attention at 512², the VAE's) and
# within a few milliseconds of it below 16 MiB, where the reference stays (CLIP, cross-attention
# at batch 1, small models, the toy reproduction). Elsewhere (GPUs in float32, unmeasured) the
# rule is about memory.
BLOCKWISE_MIN_SCORE_BYTES = {"cpu": 16 * 2**20, "default": 64 * 2**20}
# (block_q, block_k) of "blockwise", read when a program is traced: a tuning knob (tests make the
# tiles small so the tiny models run several); results do not depend on it beyond rounding.
BLOCKWISE_BLOCK_SIZES = (DEFAULT_BLOCK_Q, DEFAULT_BLOCK_K)
_HALF = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
_PALLAS_MULTIPLE = 128  # the TPU kernel's lane width: head size and sequence tiles


@dataclasses.dataclass(frozen=True)
class AttentionCall:
    """The static description of one attention call that implementations are chosen on."""

    batch: int
    q_len: int
    kv_len: int
    heads: int
    head_dim: int
    v_head_dim: int
    dtype: str  # numpy name: "float32", "bfloat16", "float16"
    is_causal: bool = False

    @classmethod
    def of(cls, q: jax.Array, k: jax.Array, v: jax.Array, is_causal: bool = False) -> AttentionCall:
        if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
            raise ValueError(
                f"attention expects q [B, Tq, N, H] and k, v [B, Tk, N, H]; got shapes {q.shape}, "
                f"{k.shape}, {v.shape}. Split the heads out of the channel axis first."
            )
        if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:] or k.shape[:3] != v.shape[:3]:
            raise ValueError(
                f"attention shapes disagree: q {q.shape}, k {k.shape}, v {v.shape} (batch and heads "
                "must match, q and k share the head size, k and v the sequence length)."
            )
        if not q.dtype == k.dtype == v.dtype:
            raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype} and {v.dtype}.")
        b, tq, n, h = q.shape
        return cls(b, tq, k.shape[1], n, h, v.shape[-1], jnp.dtype(q.dtype).name, bool(is_causal))

    @property
    def score_bytes(self) -> int:
        """Bytes of the float32 [B, N, Tq, Tk] score matrix that ``xla`` materialises."""
        return 4 * self.batch * self.heads * self.q_len * self.kv_len


@dataclasses.dataclass(frozen=True)
class Choice:
    """What runs (``implementation``) and why; ``fallback`` when the request could not be served."""

    implementation: str
    reason: str
    fallback: bool = False


def check_implementation(name: str | None) -> str:
    """``None`` → ``"auto"``; any other name must be one of ``IMPLEMENTATIONS``."""
    if name is None:
        return "auto"
    if name not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {name!r}: expected one of {', '.join(IMPLEMENTATIONS)}."
        )
    return name


def cudnn_unsupported(call: AttentionCall, platform: str) -> str | None:
    """Why cuDNN's fused attention cannot serve ``call`` on ``platform``, or None if it can."""
    if platform != "gpu":
        return f"cuDNN attention needs an NVIDIA GPU, this program runs on {platform}"
    if jnp.dtype(call.dtype) not in _HALF:
        return f"cuDNN attention needs float16 or bfloat16, got {call.dtype}"
    if call.head_dim != call.v_head_dim:
        return f"cuDNN attention needs equal q/k and v head sizes, got {call.head_dim} and {call.v_head_dim}"
    if call.head_dim % 8 or call.head_dim > 256:
        return f"cuDNN attention needs a head size that is a multiple of 8 and ≤ 256, got {call.head_dim}"
    return None


def pallas_tpu_unsupported(call: AttentionCall, platform: str) -> str | None:
    """Why the Pallas TPU kernel cannot serve ``call`` on ``platform``, or None if it can."""
    if platform != "tpu":
        return f"the Pallas TPU kernel compiles only for TPUs, this program runs on {platform}"
    if call.head_dim != call.v_head_dim:
        sizes = f"{call.head_dim} and {call.v_head_dim}"
        return f"the Pallas TPU kernel needs q/k and v heads of one size, got {sizes}"
    return None


def _size_rule(call: AttentionCall, platform: str) -> Choice:
    limit = BLOCKWISE_MIN_SCORE_BYTES.get(platform, BLOCKWISE_MIN_SCORE_BYTES["default"])
    mib = call.score_bytes / 2**20
    if call.score_bytes >= limit:
        return Choice("blockwise", f"score matrix {mib:.1f} MiB ≥ {limit / 2**20:g} MiB")
    return Choice("xla", f"score matrix {mib:.2f} MiB < {limit / 2**20:g} MiB")


_UNSUPPORTED = {"cudnn": cudnn_unsupported, "pallas_tpu": pallas_tpu_unsupported}


def select_implementation(requested: str | None, call: AttentionCall, platform: str) -> Choice:
    """The implementation that serves ``call`` when ``requested`` on ``platform``.

    ``platform`` is a ``jax.default_backend()`` name (``"cpu"``, ``"gpu"``, ``"tpu"``); a pure
    function of its arguments, so the rules are testable with any platform and dtype.
    """
    requested = check_implementation(requested)
    if requested in ("xla", "blockwise"):
        return Choice(requested, "requested")
    if requested in _UNSUPPORTED:
        why = _UNSUPPORTED[requested](call, platform)
        if why is None:
            return Choice(requested, "requested")
        size = _size_rule(call, platform)
        return Choice(size.implementation, f"{why}; {size.reason}", fallback=True)
    preferred = {"tpu": "pallas_tpu", "gpu": "cudnn"}.get(platform)
    if preferred == "cudnn" and jnp.dtype(call.dtype) not in _HALF:
        preferred = None  # float32 on GPU: the size rule, without a fallback note
    if preferred is not None:
        why = _UNSUPPORTED[preferred](call, platform)
        if why is None:
            return Choice(preferred, f"default on {platform}")
        size = _size_rule(call, platform)
        return Choice(size.implementation, f"{why}; {size.reason}", fallback=True)
    return _size_rule(call, platform)


# ------------------------------------------------------------------------------- implementations


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, is_causal: bool = False) -> jax.Array:
    """XLA's materialised attention (logits and softmax in float32): [B, Tq, N, H] → [B, Tq, N, Hv]."""
    return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation="xla")


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, is_causal: bool = False) -> jax.Array:
    """cuDNN fused flash attention (NVIDIA GPU, float16/bfloat16): [B, Tq, N, H] → [B, Tq, N, H]."""
    return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation="cudnn")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pallas_block(length: int) -> int:
    """The largest of 512, 256, 128 that divides ``length`` (a multiple of 128)."""
    return next(b for b in (512, 256, 128) if length % b == 0)


def pallas_tpu_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, is_causal: bool = False) -> jax.Array:
    """The Pallas TPU flash-attention kernel: [B, Tq, N, H] → [B, Tq, N, H] in q's dtype.

    The head size is zero-padded to a multiple of 128 (zero q/k columns leave the scores
    unchanged, zero v columns are cut from the output) and the softmax scale stays 1/√H of the
    real head size; sequences are zero-padded to multiples of 128, padded keys masked out with
    segment ids. Compiles for TPUs only; on CPU run it under
    ``jax.experimental.pallas.tpu.force_tpu_interpret_mode()`` (slow, for tests).
    """
    from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash

    b, tq, _, h = q.shape
    tk = k.shape[1]
    hp, tqp, tkp = (_round_up(x, _PALLAS_MULTIPLE) for x in (h, tq, tk))

    def prepare(x: jax.Array, length: int) -> jax.Array:  # [B, T, N, H] → padded [B, N, T', H']
        x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, hp - h)))
        return x.transpose(0, 2, 1, 3)

    segment_ids = None
    if tkp != tk:
        segment_ids = tpu_flash.SegmentIds(
            q=jnp.ones((b, tqp), jnp.int32),
            kv=jnp.broadcast_to((jnp.arange(tkp) < tk).astype(jnp.int32), (b, tkp)),
        )
    bq, bk = _pallas_block(tqp), _pallas_block(tkp)
    blocks = tpu_flash.BlockSizes(
        block_q=bq,
        block_k_major=bk,
        block_k=bk,
        block_b=1,
        block_q_major_dkv=bq,
        block_k_major_dkv=bk,
        block_k_dkv=bk,
        block_q_dkv=bq,
        block_k_major_dq=bk,
        block_k_dq=bk,
        block_q_dq=bq,
    )
    out = tpu_flash.flash_attention(
        prepare(q, tqp),
        prepare(k, tkp),
        prepare(v, tkp),
        segment_ids=segment_ids,
        causal=is_causal,
        sm_scale=float(1.0 / np.sqrt(h)),
        block_sizes=blocks,
    )
    return out[:, :, :tq, :h].transpose(0, 2, 1, 3)


def _blockwise(q: jax.Array, k: jax.Array, v: jax.Array, *, is_causal: bool = False) -> jax.Array:
    block_q, block_k = BLOCKWISE_BLOCK_SIZES
    return blockwise_attention(q, k, v, is_causal=is_causal, block_q=block_q, block_k=block_k)


_IMPLS: dict[str, Callable[..., jax.Array]] = {
    "xla": xla_attention,
    "blockwise": _blockwise,
    "cudnn": cudnn_attention,
    "pallas_tpu": pallas_tpu_attention,
}
_LOGGED: set = set()


def _log_once(requested: str, call: AttentionCall, platform: str, choice: Choice) -> None:
    key = (requested, call, platform, choice)
    if key in _LOGGED:
        return
    _LOGGED.add(key)
    shapes = f"q [{call.batch}, {call.q_len}, {call.heads}, {call.head_dim}], {call.kv_len} keys"
    causal = ", causal" if call.is_causal else ""
    message = (
        f"attention {requested!r} → {choice.implementation!r} for {shapes}{causal}, {call.dtype} "
        f"on {platform}: {choice.reason}"
    )
    level = logging.WARNING if choice.fallback and requested != "auto" else logging.INFO
    log.log(level, message)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    is_causal: bool = False,
    implementation: str | None = "auto",
    platform: str | None = None,
) -> jax.Array:
    """Multi-head attention ``softmax(q kᵀ / √H) v`` with a named implementation.

    Args:
      q: [B, Tq, N, H] queries; k: [B, Tk, N, H] keys; v: [B, Tk, N, Hv] values; one float dtype.
      is_causal: key ``j`` is visible to query ``i`` only when ``j ≤ i``.
      implementation: one of ``IMPLEMENTATIONS`` (``None`` means ``"auto"``); see the module doc.
      platform: the backend to choose for (default ``jax.default_backend()``; tests fake it).
    Returns:
      [B, Tq, N, Hv] in the dtype of ``q``. Scores and softmax statistics are float32 in every
      implementation.
    """
    requested = check_implementation(implementation)
    call = AttentionCall.of(q, k, v, is_causal)
    platform = platform or jax.default_backend()
    choice = select_implementation(requested, call, platform)
    try:
        out = _IMPLS[choice.implementation](q, k, v, is_causal=is_causal)
    except (NotImplementedError, RuntimeError, ValueError) as err:
        if choice.implementation not in _UNSUPPORTED:
            raise
        size = _size_rule(call, platform)
        choice = Choice(size.implementation, f"{choice.implementation} failed ({err}); {size.reason}", True)
        out = _IMPLS[choice.implementation](q, k, v, is_causal=is_causal)
    _log_once(requested, call, platform, choice)
    return out
