"""T5 building blocks: RMS layer norm, relative position bias, attention, the dense ReLU FFN."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from pregated_jax.config import SwitchConfig

Array = jax.Array
NEG_INF = float(jnp.finfo(jnp.float32).min)  # HF's additive mask value


def compute_dtype(config: SwitchConfig):
    return jnp.dtype(config.dtype)


def dense_init(std: float):
    return nnx.initializers.normal(stddev=std)


class RMSNorm(nnx.Module):
    """T5 layer norm: w * x * rsqrt(mean(x^2) + eps), variance in float32, no mean, no bias."""

    def __init__(self, dim: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        var = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
        y = (x.astype(jnp.float32) * jax.lax.rsqrt(var + self.eps)).astype(self.dtype)
        return self.weight[...].astype(self.dtype) * y


def relative_position_bucket(relative_position: Array, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Array:
    """T5 bucketing of `key_pos - query_pos` (exactly HF's `_relative_position_bucket`)."""
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).astype(jnp.int32) * num_buckets
        relative_position = jnp.abs(relative_position)
    else:
        relative_position = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    # Clamp to 1 only to keep log() finite where the small branch is taken anyway.
    rp = jnp.maximum(relative_position, 1).astype(jnp.float32)
    large = max_exact + (jnp.log(rp / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, relative_position, large)


class RelativePositionBias(nnx.Module):
    """Learned per-head bias from bucketed relative positions; lives in block 0, shared by the stack."""

    def __init__(self, config: SwitchConfig, bidirectional: bool, *, rngs: nnx.Rngs):
        self.embedding = nnx.Param(dense_init(1.0)(
            rngs.params(), (config.relative_attention_num_buckets, config.num_heads), jnp.float32))
        self.bidirectional = bidirectional
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance

    def __call__(self, query_positions: Array, key_positions: Array) -> Array:
        """query_positions [q], key_positions [k] (int) -> bias [1, heads, q, k] (float32)."""
        rel = key_positions[None, :] - query_positions[:, None]  # [q, k]
        buckets = relative_position_bucket(rel, self.bidirectional, self.num_buckets, self.max_distance)
        bias = self.embedding[...][buckets]  # [q, k, heads]
        return jnp.transpose(bias, (2, 0, 1))[None]


class Attention(nnx.Module):
    """Multi-head attention without 1/sqrt(d) scaling and without biases (T5)."""

    def __init__(self, config: SwitchConfig, *, rngs: nnx.Rngs):
        d, inner = config.d_model, config.num_heads * config.d_kv
        self.q = nnx.Param(dense_init((d * config.d_kv) ** -0.5)(rngs.params(), (d, inner)))
        self.k = nnx.Param(dense_init(d ** -0.5)(rngs.params(), (d, inner)))
        self.v = nnx.Param(dense_init(d ** -0.5)(rngs.params(), (d, inner)))
        self.o = nnx.Param(dense_init(inner ** -0.5)(rngs.params(), (inner, d)))
        self.num_heads, self.d_kv = config.num_heads, config.d_kv
        self.dtype = compute_dtype(config)
        self.dropout = nnx.Dropout(config.dropout_rate, rngs=rngs)

    def project_kv(self, x: Array) -> tuple[Array, Array]:
        """x [B, S, d] -> keys, values [B, heads, S, d_kv]."""
        return self._heads(x, self.k), self._heads(x, self.v)

    def _heads(self, x: Array, w: nnx.Param) -> Array:
        b, s, _ = x.shape
        y = x.astype(self.dtype) @ w[...].astype(self.dtype)  # [B, S, heads * d_kv]
        return y.reshape(b, s, self.num_heads, self.d_kv).transpose(0, 2, 1, 3)

    def __call__(self, x: Array, keys: Array, values: Array, bias: Array) -> Array:
        """x [B, q, d]; keys/values [B, heads, k, d_kv]; bias broadcastable to [B, heads, q, k]."""
        q = self._heads(x, self.q)  # [B, heads, q, d_kv]
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, keys).astype(jnp.float32) + bias
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        probs = self.dropout(probs)
        out = jnp.einsum("bhqk,bhkd->bhqd", probs, values)  # [B, heads, q, d_kv]
        b, _, s, _ = out.shape
        out = out.transpose(0, 2, 1, 3).reshape(b, s, self.num_heads * self.d_kv)
        return out @ self.o[...].astype(self.dtype)


class DenseFFN(nnx.Module):
    """wi -> ReLU -> dropout -> wo."""

    def __init__(self, config: SwitchConfig, *, rngs: nnx.Rngs):
        self.wi = nnx.Param(dense_init(config.d_model ** -0.5)(rngs.params(), (config.d_model, config.d_ff)))
        self.wo = nnx.Param(dense_init(config.d_ff ** -0.5)(rngs.params(), (config.d_ff, config.d_model)))
        self.dtype = compute_dtype(config)
        self.dropout = nnx.Dropout(config.dropout_rate, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        h = jax.nn.relu(x.astype(self.dtype) @ self.wi[...].astype(self.dtype))
        return self.dropout(h) @ self.wo[...].astype(self.dtype)


def visibility_bias(visible: Array) -> Array:
    """Boolean visibility (broadcastable to [B, heads, q, k]) -> additive bias: 0 or float32 min.

    Masks are combined as booleans first so that two masks never add up to -inf.
    """
    return jnp.where(visible, 0.0, NEG_INF).astype(jnp.float32)


def key_padding(mask: Array | None) -> Array:
    """mask [B, k] (1 = real token) -> visibility [B, 1, 1, k]; None -> all visible."""
    if mask is None:
        return jnp.ones((1, 1, 1, 1), bool)
    return mask[:, None, None, :].astype(bool)


def causal(query_positions: Array, key_positions: Array) -> Array:
    """Visibility [1, 1, q, k] that hides keys after each query."""
    return (key_positions[None, :] <= query_positions[:, None])[None, None]


def same_segment(query_segment_ids: Array, key_segment_ids: Array) -> Array:
    """Visibility [B, 1, q, k] of packed rows: a query sees the keys of its own segment; segment id 0
    (padding) sees nothing and is seen by nothing. query_segment_ids [B, q], key_segment_ids [B, k]."""
    same = query_segment_ids[:, :, None] == key_segment_ids[:, None, :]  # [B, q, k]
    return (same & (key_segment_ids[:, None, :] > 0))[:, None]
