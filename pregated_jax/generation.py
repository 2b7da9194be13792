"""Greedy generation with self- and cross-attention KV caches, compiled as one jitted loop.

The model is split into (graphdef, state) once; the encoder pass and the whole decode loop
(`jax.lax.while_loop` over `SwitchTransformer.decode_step`) are pure jitted functions of the state.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pregated_jax.memory import check_request_fits
from pregated_jax.model import SwitchTransformer, check_generation_input, check_token_ids

Array = jax.Array


@functools.partial(jax.jit, static_argnums=(0, 4))
def _greedy(graphdef, state, input_ids: Array, attention_mask: Array, max_new_tokens: int) -> Array:
    """-> new tokens [B, max_new_tokens], pad after each sequence's EOS."""
    model: SwitchTransformer = nnx.merge(graphdef, state)
    cfg = model.config
    batch = input_ids.shape[0]
    enc, _ = model.encode(input_ids, attention_mask)
    cross = model.cross_kv(enc)
    caches = model.init_caches(batch, max_new_tokens)
    out = jnp.full((batch, max_new_tokens), cfg.pad_token_id, jnp.int32)
    start = jnp.full((batch,), cfg.decoder_start_token_id, jnp.int32)

    def cond(carry):
        step, _, _, done, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, token, caches, done, out = carry
        logits, caches = model.decode_step(token[:, None], step, caches, cross, attention_mask)
        nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)  # [B]
        nxt = jnp.where(done, cfg.pad_token_id, nxt)
        out = out.at[:, step].set(nxt)
        return step + 1, nxt, caches, done | (nxt == cfg.eos_token_id), out

    carry = (jnp.int32(0), start, caches, jnp.zeros((batch,), bool), out)
    return jax.lax.while_loop(cond, body, carry)[-1]


def generate(model: SwitchTransformer, input_ids, attention_mask=None, max_new_tokens: int = 32) -> np.ndarray:
    """Greedy decoding. input_ids [B, S] -> new tokens [B, max_new_tokens] (no start token), padded
    with `pad_token_id` after EOS. Puts the model in eval mode (no dropout, no router jitter)."""
    model.eval()
    check_token_ids(input_ids, model.config.vocab_size)
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    attention_mask = jnp.asarray(attention_mask, jnp.int32)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    check_generation_input(input_ids, attention_mask)
    device = next(iter(model.shared[...].devices()))
    check_request_fits(model.config, device, input_ids.shape[0], input_ids.shape[1], max_new_tokens)
    graphdef, state = nnx.split(model)
    return np.asarray(_greedy(graphdef, state, input_ids, attention_mask, max_new_tokens))
