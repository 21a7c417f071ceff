"""Train state (a pytree), the optimizer and the pure train step.

One step = one optimizer update on ``batch_size`` samples, split into ``grad_accum`` micro-batches
that are scanned with gradients summed. The step's PRNG key is ``fold_in(key(seed), step)``, so
no RNG state needs saving and a restored run draws exactly what an uninterrupted one would.
Parameters, gradients, optimizer state and EMA are float32 (the UNet may compute in bf16).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from instaflow_jax.train.objectives import LossFn


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps done = global batches consumed
    params: Any
    ema_params: Any
    opt_state: Any


def make_schedule(config: Any, total_steps: int) -> optax.Schedule:
    """Linear warm-up to ``learning_rate``, then constant or cosine decay (``OptimizerConfig``)."""
    warmup = max(int(config.warmup_steps), 0)
    if config.schedule == "constant":
        after = optax.constant_schedule(config.learning_rate)
    else:
        after = optax.cosine_decay_schedule(
            config.learning_rate, max(total_steps - warmup, 1), alpha=config.final_lr_fraction
        )
    if warmup == 0:
        return after
    ramp = optax.linear_schedule(0.0, config.learning_rate, warmup)
    return optax.join_schedules([ramp, after], [warmup])


def make_optimizer(config: Any, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with the schedule, after global-norm clipping (``clip_norm`` 0 = off)."""
    schedule = make_schedule(config, total_steps)
    adamw = optax.adamw(
        schedule, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay
    )
    if config.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(config.clip_norm), adamw), schedule
    return adamw, schedule


def create_state(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
    """Step 0 with float32 params, an EMA copy (its own buffers, so the state can be donated)
    and the optimizer state."""
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    ema = jax.tree.map(jnp.copy, params)
    return TrainState(jnp.zeros((), jnp.int32), params, ema, optimizer.init(params))


def ema_update(ema: Any, params: Any, decay: float) -> Any:
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def micro_batches(batch: Mapping[str, jax.Array], count: int) -> dict[str, jax.Array]:
    """[B, …] → [count, B/count, …] taking every ``count``-th sample, so each micro-batch keeps
    the batch's sharding (no data movement between devices)."""
    return {k: v.reshape(v.shape[0] // count, count, *v.shape[1:]).swapaxes(0, 1) for k, v in batch.items()}


def train_step(
    state: TrainState,
    frozen: Any,
    batch: Mapping[str, jax.Array],
    *,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    ema_decay: float,
    grad_accum: int,
    seed: int,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update. Returns the new state and float32 scalar metrics
    (``loss``, ``grad_norm`` before clipping, ``lr``, plus the objective's own)."""
    key = jax.random.fold_in(jax.random.key(seed), state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum == 1:
        (_, metrics), grads = grad_fn(state.params, frozen, batch, key)
    else:

        def accumulate(carry, inputs):
            index, micro = inputs
            (_, metrics), grads = grad_fn(state.params, frozen, micro, jax.random.fold_in(key, index))
            return jax.tree.map(jnp.add, carry, (grads, metrics)), None

        micro = micro_batches(batch, grad_accum)
        (_, metric_shapes), _ = jax.eval_shape(
            grad_fn, state.params, frozen, jax.tree.map(lambda x: x[0], micro), key
        )
        zeros = (
            jax.tree.map(jnp.zeros_like, state.params),
            jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes),
        )
        (grads, metrics), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum), micro))
        grads = jax.tree.map(lambda g: g / grad_accum, grads)
        metrics = jax.tree.map(lambda m: m / grad_accum, metrics)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = TrainState(state.step + 1, params, ema_update(state.ema_params, params, ema_decay), opt_state)
    metrics = {**metrics, "grad_norm": grad_norm, "lr": jnp.asarray(schedule(state.step), jnp.float32)}
    return new_state, metrics
