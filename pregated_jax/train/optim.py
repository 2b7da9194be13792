"""Optimizers and learning-rate schedules from an `OptimizerConfig`.

Adafactor is optax's, whose defaults are T5X's (factored second moments, decay rate 0.8, update clipping
1.0, updates scaled by the parameter RMS, no momentum). The learning rate of step s (0-based) is
`schedule(s)`; the optimizer keeps its own step count in its state.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from pregated_jax.train.config import OptimizerConfig


def make_schedule(opt: OptimizerConfig, num_steps: int) -> optax.Schedule:
    """constant: linear warmup (if any) to `learning_rate`, then flat.
    linear_warmup_rsqrt: linear warmup, then `learning_rate * sqrt(warmup / step)` (T5's rsqrt decay).
    cosine: linear warmup from 0, then cosine decay to 0 at `num_steps`.
    """
    lr, warmup = opt.learning_rate, opt.warmup_steps
    if opt.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(num_steps, warmup + 1), end_value=0.0)
    w = max(warmup, 1)

    def schedule(step):
        s = jnp.asarray(step, jnp.float32) + 1.0  # 1-based: the first step already gets lr / w
        ramp = jnp.minimum(1.0, s / w) if warmup > 0 else 1.0
        if opt.schedule == "constant":
            return lr * ramp
        return lr * ramp * jnp.sqrt(w / jnp.maximum(s, w))

    return schedule


def make_optimizer(opt: OptimizerConfig, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(gradient transformation, schedule): [global-norm clip ->] Adafactor or AdamW."""
    schedule = make_schedule(opt, num_steps)
    if opt.name == "adafactor":
        tx = optax.adafactor(schedule, weight_decay_rate=opt.weight_decay or None)
    elif opt.name == "adamw":
        tx = optax.adamw(schedule, weight_decay=opt.weight_decay)
    else:  # OptimizerConfig validates the name; kept for readers
        raise ValueError(f"unknown optimizer {opt.name!r}")
    if opt.grad_clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
    return tx, schedule
