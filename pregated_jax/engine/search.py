"""Token selection for generation: greedy and beam search steps, as small jitted functions.

Beam search keeps `num_beams` hypotheses per input; a finished hypothesis (it emitted EOS) is frozen:
it can only extend with padding at log-prob 0, so it keeps competing with its final score. The result
is the hypothesis with the best score / length**length_penalty.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

Array = jax.Array


@struct.dataclass
class SearchState:
    tokens: Array  # [B, K, T] int32 generated tokens (pad-filled)
    scores: Array  # [B, K] float32 sum of log-probs
    lengths: Array  # [B, K] int32 tokens up to and including EOS
    finished: Array  # [B, K] bool
    step: Array  # [] int32
    last: Array  # [B * K] int32 tokens fed to the next decoder step


def init_search(batch: int, beams: int, max_new_tokens: int, start_token: int) -> SearchState:
    return _init(batch, beams, max_new_tokens, start_token)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _init(batch, beams, max_new_tokens, start_token):
    scores = jnp.full((batch, beams), -jnp.inf, jnp.float32).at[:, 0].set(0.0)  # one live beam at first
    return SearchState(jnp.zeros((batch, beams, max_new_tokens), jnp.int32), scores,
                       jnp.zeros((batch, beams), jnp.int32), jnp.zeros((batch, beams), bool),
                       jnp.int32(0), jnp.full((batch * beams,), start_token, jnp.int32))


@functools.partial(jax.jit, static_argnums=(2, 3), donate_argnums=0)
def greedy_step(state: SearchState, logits: Array, pad: int, eos: int) -> SearchState:
    """logits [B, V] of the last position -> state with one more token per row (K = 1)."""
    nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B]
    done = state.finished[:, 0]
    nxt = jnp.where(done, pad, nxt)
    tokens = state.tokens.at[:, 0, state.step].set(nxt)
    lengths = state.lengths + (~state.finished).astype(jnp.int32)
    finished = state.finished | (nxt == eos)[:, None]
    return SearchState(tokens, state.scores, lengths, finished, state.step + 1, nxt)


@functools.partial(jax.jit, static_argnums=(2, 3), donate_argnums=0)
def beam_step(state: SearchState, logits: Array, pad: int, eos: int) -> tuple[SearchState, Array]:
    """logits [B * K, V] -> (state, origin [B * K]: which old row each new beam continues)."""
    b, k, _ = state.tokens.shape
    v = logits.shape[-1]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(b, k, v)
    frozen = jnp.full((v,), -jnp.inf).at[pad].set(0.0)  # a finished beam may only add padding
    logp = jnp.where(state.finished[..., None], frozen, logp)
    cand = (state.scores[..., None] + logp).reshape(b, k * v)
    scores, flat = jax.lax.top_k(cand, k)  # [B, K]
    beam, token = flat // v, (flat % v).astype(jnp.int32)
    take = lambda a: jnp.take_along_axis(a, beam, axis=1)  # noqa: E731
    was_finished = take(state.finished)
    tokens = jnp.take_along_axis(state.tokens, beam[..., None], axis=1).at[:, :, state.step].set(token)
    lengths = take(state.lengths) + (~was_finished).astype(jnp.int32)
    finished = was_finished | (token == eos)
    origin = (beam + jnp.arange(b)[:, None] * k).reshape(-1)
    return SearchState(tokens, scores, lengths, finished, state.step + 1, token.reshape(-1)), origin


@functools.partial(jax.jit, static_argnums=1)
def best_sequences(state: SearchState, length_penalty: float = 1.0) -> Array:
    """-> [B, T] the best hypothesis of each input by score / length**length_penalty."""
    norm = state.scores / jnp.maximum(state.lengths, 1).astype(jnp.float32) ** length_penalty
    best = jnp.argmax(norm, axis=1)  # [B]
    return jnp.take_along_axis(state.tokens, best[:, None, None], axis=1)[:, 0]


@jax.jit
def reorder(tree, origin: Array):
    """Gathers the batch rows of every array in `tree` (KV caches) by `origin` [B * K]."""
    return jax.tree.map(lambda a: jnp.take(a, origin, axis=0), tree)


@jax.jit
def all_finished(state: SearchState) -> Array:
    return jnp.all(state.finished)
