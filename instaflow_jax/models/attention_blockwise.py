"""Blockwise attention in pure JAX: the score matrix is never materialised.

The forward pass is the FlashAttention-2 recurrence (Dao 2023; Rabe & Staats, "Self-attention does
not need O(n²) memory"): queries are taken ``block_q`` rows at a time, and for each query block an
online softmax runs over ``block_k`` keys at a time, keeping only the running row maximum ``m``,
the running normaliser ``l`` and the un-normalised output. A ``jax.custom_vjp`` saves the inputs,
the output and the log-sum-exp ``m + log l`` (float32, [B, N, Tq]) and recomputes each score tile
in the backward pass, so memory is linear in the sequence lengths in both passes: one
``[B·N, block_q, block_k]`` float32 tile at a time instead of ``[B, N, Tq, Tk]``.

Scores, the softmax statistics and all accumulators are float32 whatever the input dtype; the
matmuls take the input dtype (bf16 inputs → bf16 matmuls with float32 accumulation). The softmax
runs in base 2 (``exp2`` of scores scaled by log2 e, the same numbers; cheaper than ``exp`` on
CPUs), and float32 queries are scaled once rather than every score tile. Sequence
lengths that are not multiples of the blocks are zero-padded and the padded keys masked; causal
masking (key ``j`` visible to query ``i`` iff ``j ≤ i``, as in ``jax.nn.dot_product_attention``)
is applied per tile. Composes with ``jit``, ``vmap``, ``grad`` and ``remat`` (first-order
gradients only).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# Tile sizes measured fastest on a 2-core x86 CPU for the SD 1.5 UNet's 4096-token attention
# (benchmarks/bench_attention.py); numerics do not depend on them.
DEFAULT_BLOCK_Q = 256
DEFAULT_BLOCK_K = 512
_MASKED = -1e30  # finite: exp2(_MASKED - m) is exactly 0 for any real row maximum m
_LOG2E = np.float32(1.4426950408889634)  # softmax in base 2: exp(x) = exp2(x · log2 e), cheaper on CPUs


def blockwise_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    is_causal: bool = False,
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
) -> jax.Array:
    """Softmax attention ``softmax(q kᵀ / √H) v`` computed tile by tile.

    Args:
      q: [B, Tq, N, H] queries (float32, bfloat16 or float16).
      k: [B, Tk, N, H] keys, same dtype as ``q``.
      v: [B, Tk, N, Hv] values, same dtype as ``q``.
      is_causal: mask key ``j`` for query ``i`` when ``j > i``.
      block_q, block_k: tile sizes (clipped to the sequence lengths); they change speed and
        memory, not results beyond float rounding.
    Returns:
      [B, Tq, N, Hv] in the dtype of ``q``.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"blockwise attention expects q [B, Tq, N, H], k and v [B, Tk, N, H]; got shapes "
            f"{q.shape}, {k.shape}, {v.shape}."
        )
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:] or k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"q {q.shape}, k {k.shape} and v {v.shape} disagree: batch and heads must match, q and k "
            "share the head size, k and v the sequence length."
        )
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}.")
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block sizes must be positive, got block_q={block_q}, block_k={block_k}.")
    return _attention(q, k, v, bool(is_causal), min(block_q, q.shape[1]), min(block_k, k.shape[1]))


# ------------------------------------------------------------------------------- layout helpers


def _to_blocks(x: jax.Array, block: int) -> jax.Array:
    """[B, T, N, H] → [T'/block, B·N, block, H], T zero-padded to a multiple T' of ``block``."""
    b, t, n, h = x.shape
    pad = (-t) % block
    if pad:
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
    x = x.transpose(0, 2, 1, 3).reshape(b * n, (t + pad) // block, block, h)
    return x.transpose(1, 0, 2, 3)


def _from_blocks(x: jax.Array, batch: int, length: int) -> jax.Array:
    """Inverse of ``_to_blocks``: [T'/block, B·N, block, H] → [B, T, N, H]."""
    nb, bn, block, h = x.shape
    x = x.transpose(1, 0, 2, 3).reshape(batch, bn // batch, nb * block, h)[:, :, :length]
    return x.transpose(0, 2, 1, 3)


def _scan(step, init, xs):
    """``lax.scan`` over the leading axis of ``xs``, inlined when it has a single block."""
    if jax.tree.leaves(xs)[0].shape[0] > 1:
        return jax.lax.scan(step, init, xs)
    carry, y = step(init, jax.tree.map(lambda x: x[0], xs))
    return carry, jax.tree.map(lambda t: t[None], y)


def _map(fn, xs):
    """``lax.map`` over the leading axis of ``xs``, inlined when it has a single block."""
    return _scan(lambda carry, x: (carry, fn(x)), (), xs)[1]


def _dot(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """``einsum`` in the operands' dtype with float32 accumulation and result."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _scores(q_tile, k_tile, scale, qi, kj, block_q, block_k, kv_len, causal) -> jax.Array:
    """Float32 scores of one tile [B·N, block_q, block_k] times ``scale`` (None: q is pre-scaled),
    masked where needed."""
    s = _dot("bqh,bkh->bqk", q_tile, k_tile)
    if scale is not None:
        s = s * scale
    padded = kv_len % block_k != 0
    if not (padded or causal):
        return s
    k_pos = kj * block_k + jnp.arange(block_k)
    visible = (k_pos < kv_len)[None, :]
    if causal:
        q_pos = qi * block_q + jnp.arange(block_q)
        visible = visible & (k_pos[None, :] <= q_pos[:, None])
    return jnp.where(visible[None], s, _MASKED)


# ------------------------------------------------------------------------------- forward


def _forward(q, k, v, causal, block_q, block_k):
    """(output [nq, B·N, block_q, Hv] in q's dtype, base-2 log-sum-exp [nq, B·N, block_q] float32)."""
    kv_len, head = k.shape[1], q.shape[-1]
    scale = np.float32(1.0 / np.sqrt(head)) * _LOG2E
    if q.dtype == jnp.float32:  # scale q once instead of every score tile (exact enough in float32)
        q, scale = q * scale, None
    qb, kb, vb = _to_blocks(q, block_q), _to_blocks(k, block_k), _to_blocks(v, block_k)
    bn, hv = qb.shape[1], vb.shape[-1]
    key_blocks = (jnp.arange(kb.shape[0]), kb, vb)

    def query_block(args):
        qi, q_tile = args

        def key_step(carry, args):
            m, denom, acc = carry
            kj, k_tile, v_tile = args
            s = _scores(q_tile, k_tile, scale, qi, kj, block_q, block_k, kv_len, causal)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp2(s - m_new[..., None])
            correction = jnp.exp2(m - m_new)
            denom = denom * correction + p.sum(-1)
            acc = acc * correction[..., None] + _dot("bqk,bkh->bqh", p.astype(v_tile.dtype), v_tile)
            return (m_new, denom, acc), None

        init = (
            jnp.full((bn, block_q), _MASKED, jnp.float32),
            jnp.zeros((bn, block_q), jnp.float32),
            jnp.zeros((bn, block_q, hv), jnp.float32),
        )
        (m, denom, acc), _ = _scan(key_step, init, key_blocks)
        return (acc / denom[..., None]).astype(v.dtype), m + jnp.log2(denom)

    return _map(query_block, (jnp.arange(qb.shape[0]), qb))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _attention(q, k, v, causal, block_q, block_k):
    out, _ = _forward(q, k, v, causal, block_q, block_k)
    return _from_blocks(out, q.shape[0], q.shape[1])


def _attention_fwd(q, k, v, causal, block_q, block_k):
    out, lse = _forward(q, k, v, causal, block_q, block_k)
    return _from_blocks(out, q.shape[0], q.shape[1]), (q, k, v, out, lse)


# ------------------------------------------------------------------------------- backward


def _attention_bwd(causal, block_q, block_k, residuals, d_out):
    """FlashAttention-2 backward: recompute each tile's probabilities from the saved log-sum-exp.

    dV = Pᵀ dO, dP = dO Vᵀ, dS = P ∘ (dP − rowsum(dO ∘ O)), dQ = dS K / √H, dK = dSᵀ Q / √H.
    Outer scan over key blocks (dK, dV of that block), inner scan over query blocks (dQ carried).
    """
    q, k, v, out, lse = residuals
    kv_len, head = k.shape[1], q.shape[-1]
    scale = np.float32(1.0 / np.sqrt(head))
    scale2 = scale * _LOG2E  # the forward's base-2 scores
    qb, kb, vb = _to_blocks(q, block_q), _to_blocks(k, block_k), _to_blocks(v, block_k)
    dob = _to_blocks(d_out.astype(q.dtype), block_q)
    delta = jnp.sum(dob.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [nq, B·N, block_q]
    query_blocks = (jnp.arange(qb.shape[0]), qb, dob, lse, delta)

    def key_block(dq, args):
        kj, k_tile, v_tile = args

        def query_step(carry, args):
            dk, dv = carry
            (qi, q_tile, do_tile, lse_tile, delta_tile), dq_tile = args
            s = _scores(q_tile, k_tile, scale2, qi, kj, block_q, block_k, kv_len, causal)
            p = jnp.exp2(s - lse_tile[..., None])
            dv = dv + _dot("bqk,bqh->bkh", p.astype(v.dtype), do_tile)
            ds = (p * (_dot("bqh,bkh->bqk", do_tile, v_tile) - delta_tile[..., None])).astype(q.dtype)
            dq_tile = dq_tile + _dot("bqk,bkh->bqh", ds, k_tile)
            dk = dk + _dot("bqk,bqh->bkh", ds, q_tile)
            return (dk, dv), dq_tile

        zeros = (
            jnp.zeros(k_tile.shape, jnp.float32),
            jnp.zeros(v_tile.shape, jnp.float32),
        )
        (dk, dv), dq = _scan(query_step, zeros, (query_blocks, dq))
        return dq, (dk, dv)

    dq0 = jnp.zeros(qb.shape, jnp.float32)
    dq, (dk, dv) = _scan(key_block, dq0, (jnp.arange(kb.shape[0]), kb, vb))
    batch = q.shape[0]
    return (
        _from_blocks(dq * scale, batch, q.shape[1]).astype(q.dtype),
        _from_blocks(dk * scale, batch, kv_len).astype(k.dtype),
        _from_blocks(dv, batch, kv_len).astype(v.dtype),
    )


_attention.defvjp(_attention_fwd, _attention_bwd)
