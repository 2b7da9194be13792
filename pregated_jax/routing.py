"""Top-1 routing: the router, its typed decision, capacity, and the router losses.

The router's output is a `RouterDecision` value that an expert layer consumes. In pre-gated models the
decision consumed by MoE block N+1 is produced by the pre-gate of block N, so the decision travels between
block calls as a plain pytree value that an inference engine can read.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from pregated_jax.layers import dense_init

Array = jax.Array


@struct.dataclass
class RouterDecision:
    """What a top-1 router decided for every token of a batch."""

    expert_index: Array  # [B, S] int32, argmax expert per token
    combine_weight: Array  # [B, S] float32, top-1 router probability
    keep: Array  # [B, S] bool, False where capacity dropped the token
    logits: Array  # [B, S, E] float32, raw router logits (for the losses)

    @property
    def num_experts(self) -> int:
        return self.logits.shape[-1]


class Router(nnx.Module):
    """Linear classifier d_model -> num_experts, run in float32, with training-only jitter."""

    def __init__(self, d_model: int, num_experts: int, jitter_noise: float, *, rngs: nnx.Rngs):
        self.classifier = nnx.Param(dense_init(d_model ** -0.5)(rngs.params(), (d_model, num_experts)))
        self.jitter_noise = jitter_noise
        self.deterministic = False  # set by nnx's Module.train() / eval()
        self.rngs = rngs

    def __call__(self, x: Array, capacity: int | None, deterministic: bool | None = None) -> RouterDecision:
        """x [B, S, d] (the MoE block's normalized input) -> decision for B sequences of S tokens."""
        deterministic = self.deterministic if deterministic is None else deterministic
        x = x.astype(jnp.float32)
        if not deterministic and self.jitter_noise > 0:
            eps = self.jitter_noise
            x = x * jax.random.uniform(self.rngs.jitter(), x.shape, jnp.float32, 1.0 - eps, 1.0 + eps)
        logits = x @ self.classifier[...].astype(jnp.float32)  # [B, S, E]
        return decide(logits, capacity)


def decide(logits: Array, capacity: int | None) -> RouterDecision:
    """Top-1 decision from router logits [B, S, E]; capacity is per sequence and expert (None: dropless).

    Earlier tokens of a sequence win (cumsum over the sequence, padding counts), as in HF.
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    index = jnp.argmax(probs, axis=-1).astype(jnp.int32)  # [B, S]
    weight = jnp.max(probs, axis=-1)  # [B, S]
    if capacity is None:
        keep = jnp.ones(index.shape, bool)
    else:
        onehot = jax.nn.one_hot(index, logits.shape[-1], dtype=jnp.int32)  # [B, S, E]
        priority = jnp.cumsum(onehot, axis=1)  # [B, S, E] 1-based position in its expert's queue
        keep = jnp.sum(priority * onehot, axis=-1) <= capacity
    return RouterDecision(expert_index=index, combine_weight=weight, keep=keep, logits=logits)


def z_loss(logits: Array) -> Array:
    """sum(logsumexp(logits)^2) / (B * S) for logits [B, S, E]."""
    b, s, _ = logits.shape
    return jnp.sum(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1))) / (b * s)


def load_balancing_loss(logits: Array) -> Array:
    """mean_e(frac_e * meanprob_e) * E^2 per batch row, averaged; expert = argmax of raw logits."""
    e = logits.shape[-1]
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)  # [B, S, E]
    onehot = jax.nn.one_hot(jnp.argmax(logits, axis=-1), e, dtype=jnp.float32)  # [B, S, E]
    frac = jnp.mean(onehot, axis=-2)  # [B, E]
    mean_prob = jnp.mean(probs, axis=-2)  # [B, E]
    return jnp.mean(frac * mean_prob) * (e ** 2)


def stack_losses(decisions: list[RouterDecision]) -> tuple[Array, Array]:
    """(z_loss, load_balancing_loss) over a stack's decisions, logits concatenated along the sequence."""
    if not decisions:
        zero = jnp.zeros((), jnp.float32)
        return zero, zero
    logits = jnp.concatenate([d.logits for d in decisions], axis=1)  # [B, S * n_sparse, E]
    return z_loss(logits), load_balancing_loss(logits)
