"""The Switch Transformer (T5 encoder-decoder, top-1 MoE every `sparse_step`-th FFN) in Flax NNX.

Routing roles inside one stack, for MoE blocks m_0 < m_1 < ... < m_k:
- conventional: every m_j owns a `router` that routes its own tokens;
- pregated: m_0 owns a `router` for itself; m_j (j < k) owns a `pregate` whose decision is consumed by
  m_{j+1}; m_k owns neither. The decision is a `RouterDecision` value returned by one block call and
  passed to the next, so an engine can read it between block calls. Pre-gating never crosses stacks.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import SingleDeviceSharding

from pregated_jax.config import SwitchConfig
from pregated_jax.memory import put_on_host
from pregated_jax.layers import (Attention, DenseFFN, RelativePositionBias, RMSNorm, causal,
                                 compute_dtype, dense_init, key_padding, same_segment, visibility_bias)
from pregated_jax.moe import Experts, ExpertSlots
from pregated_jax.routing import Router, RouterDecision, stack_losses

Array = jax.Array
StackKind = Literal["encoder", "decoder"]


@struct.dataclass
class KVCache:
    """Self-attention cache of one decoder block."""

    keys: Array  # [B, heads, max_len, d_kv]
    values: Array  # [B, heads, max_len, d_kv]


@struct.dataclass
class CrossKV:
    """Cross-attention keys/values of one decoder block, computed once from the encoder output."""

    keys: Array  # [B, heads, S_enc, d_kv]
    values: Array  # [B, heads, S_enc, d_kv]


@struct.dataclass
class BlockOutput:
    hidden: Array  # [B, S, d]
    decision: RouterDecision | None  # the decision this block's experts used (None: dense block)
    next_decision: RouterDecision | None  # pre-gate's decision for the next MoE block
    cache: KVCache | None = None


@struct.dataclass
class ModelAux:
    """Router losses and per-MoE-block decisions of a forward pass."""

    encoder_z_loss: Array
    encoder_aux_loss: Array
    decoder_z_loss: Array
    decoder_aux_loss: Array
    encoder_decisions: tuple  # RouterDecision per encoder MoE block, in order
    decoder_decisions: tuple


def routing_roles(config: SwitchConfig, stack: StackKind) -> dict[int, tuple[bool, bool]]:
    """block index -> (has_router, has_pregate) for every MoE block of a stack."""
    sparse = config.sparse_blocks(stack)
    if config.routing == "conventional":
        return {i: (True, False) for i in sparse}
    return {i: (j == 0, j < len(sparse) - 1) for j, i in enumerate(sparse)}


class Block(nnx.Module):
    """Self-attention, [cross-attention,] FFN or MoE; each sublayer pre-normed, residual, dropout."""

    def __init__(self, config: SwitchConfig, stack: StackKind, index: int, *, rngs: nnx.Rngs):
        dtype = compute_dtype(config)
        norm = lambda: RMSNorm(config.d_model, config.layer_norm_epsilon, dtype)  # noqa: E731
        self.config = config
        self.self_attn_norm = norm()
        self.self_attn = Attention(config, rngs=rngs)
        self.is_decoder = stack == "decoder"
        if self.is_decoder:
            self.cross_attn_norm = norm()
            self.cross_attn = Attention(config, rngs=rngs)
        self.ffn_norm = norm()
        roles = routing_roles(config, stack)
        self.is_sparse = index in roles
        if self.is_sparse:
            has_router, has_pregate = roles[index]
            self.experts = Experts(config, rngs=rngs)
            jitter = config.router_jitter_noise
            self.router = Router(config.d_model, config.num_experts, jitter, rngs=rngs) if has_router else None
            self.pregate = Router(config.d_model, config.num_experts, jitter, rngs=rngs) if has_pregate else None
        else:
            self.ffn = DenseFFN(config, rngs=rngs)
        self.dropout = nnx.Dropout(config.dropout_rate, rngs=rngs)

    def attend_self(self, x: Array, bias: Array, cache: KVCache | None, cache_index: Array | None):
        """Self-attention sublayer; with a cache, writes this step's keys/values at `cache_index`."""
        h = self.self_attn_norm(x)
        keys, values = self.self_attn.project_kv(h)  # [B, heads, S, d_kv]
        if cache is not None:
            start = (0, 0, cache_index, 0)
            keys = jax.lax.dynamic_update_slice(cache.keys, keys.astype(cache.keys.dtype), start)
            values = jax.lax.dynamic_update_slice(cache.values, values.astype(cache.values.dtype), start)
            cache = KVCache(keys=keys, values=values)
        return x + self.dropout(self.self_attn(h, keys, values, bias)), cache

    def route(self, h: Array, decision: RouterDecision | None, positions: Array | None = None):
        """(decision for this block, pre-gate decision for the next MoE block) from normed input h.

        positions [B, S] (packed rows, see `segment_capacity_keep`): the expert capacity applies per segment.
        """
        capacity = self.config.capacity(h.shape[1])

        def per_segment(d: RouterDecision) -> RouterDecision:
            if positions is None or capacity is None:
                return d
            return d.replace(keep=segment_capacity_keep(d.expert_index, positions, d.num_experts, capacity))

        if self.router is not None:
            decision = per_segment(self.router(h, capacity))
        elif decision is None:
            raise ValueError("this MoE block is pre-gated: pass the previous MoE block's pre-gate decision")
        next_decision = per_segment(self.pregate(h, capacity)) if self.pregate is not None else None
        return decision, next_decision

    def attend(self, x: Array, self_bias: Array, *, cross: CrossKV | None = None,
               cross_bias: Array | None = None, cache: KVCache | None = None,
               cache_index: Array | None = None) -> tuple[Array, KVCache | None]:
        """The attention sublayers: x [B, S, d] -> (x [B, S, d], updated cache)."""
        x, cache = self.attend_self(x, self_bias, cache, cache_index)
        if self.is_decoder:
            h = self.cross_attn_norm(x)
            x = x + self.dropout(self.cross_attn(h, cross.keys, cross.values, cross_bias))
        return x, cache

    def ffn_output(self, x: Array, h: Array, decision: RouterDecision | None,
                   slots: ExpertSlots | None = None) -> Array:
        """Residual FFN/MoE sublayer given its normed input h = ffn_norm(x); [B, S, d]."""
        y = self.experts(h, decision, slots) if self.is_sparse else self.ffn(h)
        return x + self.dropout(y)

    def attend_and_route(self, x: Array, self_bias: Array, *, decision: RouterDecision | None = None,
                         cross: CrossKV | None = None, cross_bias: Array | None = None,
                         cache: KVCache | None = None, cache_index: Array | None = None,
                         positions: Array | None = None):
        """Everything before the FFN's matmuls: attention sublayers, FFN norm, routing.

        -> (x [B, S, d], h = ffn_norm(x) [B, S, d], decision used here, pre-gate decision, cache).
        Decisions are None for dense blocks. positions [B, S]: packed rows' per-segment positions.
        """
        x, cache = self.attend(x, self_bias, cross=cross, cross_bias=cross_bias, cache=cache,
                               cache_index=cache_index)
        h = self.ffn_norm(x)
        next_decision = None
        if self.is_sparse:
            decision, next_decision = self.route(h, decision, positions)
        else:
            decision = None
        return x, h, decision, next_decision, cache

    def __call__(self, x: Array, self_bias: Array, *, decision: RouterDecision | None = None,
                 cross: CrossKV | None = None, cross_bias: Array | None = None,
                 cache: KVCache | None = None, cache_index: Array | None = None,
                 positions: Array | None = None) -> BlockOutput:
        """x [B, S, d]; self_bias [B|1, heads, S, K]; cross_bias [B|1, 1, 1|S, S_enc];
        positions [B, S] only for packed rows (per-segment expert capacity)."""
        x, h, decision, next_decision, cache = self.attend_and_route(
            x, self_bias, decision=decision, cross=cross, cross_bias=cross_bias, cache=cache,
            cache_index=cache_index, positions=positions)
        return BlockOutput(self.ffn_output(x, h, decision), decision, next_decision, cache)


class Stack(nnx.Module):
    """An encoder or decoder stack; the relative position bias is computed once and shared."""

    def __init__(self, config: SwitchConfig, kind: StackKind, *, rngs: nnx.Rngs):
        n = config.num_layers if kind == "encoder" else config.num_decoder_layers
        self.kind = kind
        self.relative_bias = RelativePositionBias(config, bidirectional=kind == "encoder", rngs=rngs)
        self.blocks = nnx.List([Block(config, kind, i, rngs=rngs) for i in range(n)])
        self.final_norm = RMSNorm(config.d_model, config.layer_norm_epsilon, compute_dtype(config))
        self.dropout = nnx.Dropout(config.dropout_rate, rngs=rngs)

    def self_bias(self, query_positions: Array, key_positions: Array, key_mask: Array | None) -> Array:
        return self_attention_bias(self.relative_bias, self.kind, query_positions, key_positions, key_mask)

    def __call__(self, x: Array, mask: Array | None = None, *, cross: list[CrossKV] | None = None,
                 cross_mask: Array | None = None, caches: list[KVCache] | None = None,
                 cache_index: Array | None = None, segment_ids: Array | None = None,
                 positions: Array | None = None, cross_segment_ids: Array | None = None):
        """x [B, S, d] embeddings -> (hidden [B, S, d], decisions per MoE block, caches).

        Without caches this is a full-sequence pass. With `caches` (decoder only) the S new tokens sit
        at positions cache_index .. cache_index + S - 1 and attend over the whole cache, whose keys
        beyond the current position are hidden by the causal mask; `mask` is then ignored.

        Packed rows (full pass only): segment_ids [B, S] (1, 2, ... per example, 0 = padding) confine
        attention to a segment (so each token sees the relative positions it has unpacked, see
        `packed_self_attention_bias`); positions [B, S] (0, 1, ... within each segment) count the expert
        capacity per segment; the decoder's cross_segment_ids [B, S_enc] (the encoder's segment ids) let each
        target segment see only its own input. None: the unpacked path, unchanged.
        """
        packed = segment_ids is not None
        if packed:
            if caches is not None or positions is None or (cross is not None and cross_segment_ids is None):
                raise ValueError("packed rows (segment_ids) need positions (and cross_segment_ids in the "
                                 "decoder) and a full pass without caches")
            bias = packed_self_attention_bias(self.relative_bias, self.kind, segment_ids, mask)
        else:
            token_positions = jnp.arange(x.shape[1])
            if caches is None:
                bias = self.self_bias(token_positions, token_positions, mask)
            else:
                bias = self.self_bias(cache_index + token_positions, jnp.arange(caches[0].keys.shape[2]), None)
        if cross is None:
            cross_bias = None
        elif packed:  # [B, 1, T, S_enc]
            cross_bias = visibility_bias(key_padding(cross_mask) & same_segment(segment_ids, cross_segment_ids))
        else:
            cross_bias = visibility_bias(key_padding(cross_mask))
        x = self.dropout(x)
        decision, decisions, new_caches = None, [], []
        for i, block in enumerate(self.blocks):
            out = block(x, bias, decision=decision, cross=None if cross is None else cross[i],
                        cross_bias=cross_bias, cache=None if caches is None else caches[i],
                        cache_index=cache_index, positions=positions if packed else None)
            x = out.hidden
            new_caches.append(out.cache)
            if out.decision is not None:
                decisions.append(out.decision)
                decision = out.next_decision
        return self.dropout(self.final_norm(x)), decisions, (None if caches is None else new_caches)


def check_token_ids(ids, vocab_size: int, name: str = "input_ids") -> None:
    """Raises ValueError unless `ids` are integers in [0, vocab_size): the embedding lookup would clamp or
    wrap any other id without an error. Checked on the host before dispatch; tracers (inside jit or grad,
    as in training) are not checked."""
    if isinstance(ids, jax.core.Tracer):
        return
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must be integer token ids, got dtype {ids.dtype}")
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        pos = tuple(int(i) for i in np.argwhere(bad)[0])
        where = f"row {pos[0]}, column {pos[1]}" if len(pos) == 2 else f"index {pos}"
        raise ValueError(f"{name} has id {ids[pos]} at {where}, outside the vocabulary: ids must be in "
                         f"[0, {vocab_size}) (vocab_size {vocab_size}); {int(bad.sum())} id(s) out of range")


def check_generation_input(input_ids, attention_mask) -> None:
    """Raises ValueError for an empty batch, an empty input, or a row whose attention mask hides every token
    (it would attend to nothing, and generation would run on padding). Host arrays [B, S], checked before
    dispatch."""
    batch, length = np.shape(input_ids)
    if batch == 0 or length == 0:
        raise ValueError(f"input_ids has shape ({batch}, {length}): generation needs at least one row and one "
                         f"token per row (shape [batch >= 1, length >= 1])")
    if attention_mask is not None:
        empty = ~np.asarray(attention_mask).astype(bool).any(axis=1)
        if empty.any():
            rows = np.flatnonzero(empty)
            raise ValueError(f"attention_mask row {int(rows[0])} is all zeros ({len(rows)} such row(s)): every "
                             f"row needs at least one real token (mask value 1)")


class SwitchTransformer(nnx.Module):
    """`model(input_ids, decoder_input_ids, attention_mask, decoder_attention_mask)` -> logits [B, T, V]."""

    def __init__(self, config: SwitchConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.shared = nnx.Param(dense_init(1.0)(rngs.params(), (config.vocab_size, config.d_model)))
        self.encoder = Stack(config, "encoder", rngs=rngs)
        self.decoder = Stack(config, "decoder", rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = nnx.Param(dense_init(config.d_model ** -0.5)(
                rngs.params(), (config.d_model, config.vocab_size)))

    def embed(self, ids: Array) -> Array:
        """ids [B, S] int -> [B, S, d] in the compute dtype."""
        return self.shared[...][ids].astype(compute_dtype(self.config))

    def encode(self, input_ids: Array, attention_mask: Array | None = None, segment_ids: Array | None = None,
               positions: Array | None = None):
        """-> (encoder hidden [B, S, d], decisions per encoder MoE block). segment_ids / positions [B, S]:
        packed rows (see `Stack.__call__`)."""
        hidden, decisions, _ = self.encoder(self.embed(input_ids), attention_mask, segment_ids=segment_ids,
                                            positions=positions)
        return hidden, decisions

    def cross_kv(self, encoder_hidden: Array) -> list[CrossKV]:
        """Cross-attention keys/values of every decoder block."""
        return [CrossKV(*b.cross_attn.project_kv(encoder_hidden)) for b in self.decoder.blocks]

    def decode(self, decoder_input_ids: Array, encoder_hidden: Array, attention_mask: Array | None = None,
               decoder_attention_mask: Array | None = None, segment_ids: Array | None = None,
               positions: Array | None = None, encoder_segment_ids: Array | None = None):
        """-> (decoder hidden [B, T, d], decisions per decoder MoE block). segment_ids / positions [B, T] and
        encoder_segment_ids [B, S]: packed rows (see `Stack.__call__`)."""
        hidden, decisions, _ = self.decoder(self.embed(decoder_input_ids), decoder_attention_mask,
                                            cross=self.cross_kv(encoder_hidden), cross_mask=attention_mask,
                                            segment_ids=segment_ids, positions=positions,
                                            cross_segment_ids=encoder_segment_ids)
        return hidden, decisions

    def init_caches(self, batch: int, max_len: int) -> list[KVCache]:
        """Zeroed self-attention caches for every decoder block."""
        c = self.config
        shape = (batch, c.num_heads, max_len, c.d_kv)
        zeros = lambda: jnp.zeros(shape, compute_dtype(c))  # noqa: E731
        return [KVCache(zeros(), zeros()) for _ in self.decoder.blocks]

    def decode_step(self, tokens: Array, cache_index: Array, caches: list[KVCache], cross: list[CrossKV],
                    attention_mask: Array | None = None):
        """One cached decoder step. tokens [B, S] at positions cache_index.. -> (logits [B, S, V], caches)."""
        hidden, _, caches = self.decoder(self.embed(tokens), cross=cross, cross_mask=attention_mask,
                                         caches=caches, cache_index=cache_index)
        return self.logits(hidden), caches

    def logits(self, hidden: Array) -> Array:
        lm_head = None if self.config.tie_word_embeddings else self.lm_head[...]
        return lm_logits(hidden, self.shared[...], lm_head, self.config.d_model)

    def __call__(self, input_ids: Array, decoder_input_ids: Array, attention_mask: Array | None = None,
                 decoder_attention_mask: Array | None = None, *, return_aux: bool = False,
                 encoder_segment_ids: Array | None = None, encoder_positions: Array | None = None,
                 decoder_segment_ids: Array | None = None, decoder_positions: Array | None = None):
        """Packed rows (several examples per row, t5x's names): encoder_segment_ids / encoder_positions
        [B, S] and decoder_segment_ids / decoder_positions [B, T], all four or none; segment k of the
        decoder attends to segment k of the encoder. `decoder_input_ids` must then be shifted per segment
        (each segment starts with decoder_start), as `pregated_jax.data.grain_pipeline` builds them."""
        check_token_ids(input_ids, self.config.vocab_size)
        check_token_ids(decoder_input_ids, self.config.vocab_size, "decoder_input_ids")
        packing = (encoder_segment_ids, encoder_positions, decoder_segment_ids, decoder_positions)
        if any(p is None for p in packing) and any(p is not None for p in packing):
            names = ("encoder_segment_ids", "encoder_positions", "decoder_segment_ids", "decoder_positions")
            raise ValueError("packed inputs need all of encoder_segment_ids, encoder_positions, decoder_segment_ids "
                             f"and decoder_positions; missing {[n for n, p in zip(names, packing) if p is None]}")
        enc, enc_decisions = self.encode(input_ids, attention_mask, encoder_segment_ids, encoder_positions)
        dec, dec_decisions = self.decode(decoder_input_ids, enc, attention_mask, decoder_attention_mask,
                                         decoder_segment_ids, decoder_positions, encoder_segment_ids)
        logits = self.logits(dec)
        if not return_aux:
            return logits
        ez, ea = stack_losses(enc_decisions)
        dz, da = stack_losses(dec_decisions)
        return logits, ModelAux(ez, ea, dz, da, tuple(enc_decisions), tuple(dec_decisions))


def self_attention_bias(relative_bias: RelativePositionBias, kind: StackKind, query_positions: Array,
                        key_positions: Array, key_mask: Array | None) -> Array:
    """Relative position bias plus masks (padding; causal in the decoder) -> [B|1, heads, q, k] float32."""
    visible = key_padding(key_mask)
    if kind == "decoder":
        visible = visible & causal(query_positions, key_positions)
    return relative_bias(query_positions, key_positions) + visibility_bias(visible)


def packed_self_attention_bias(relative_bias: RelativePositionBias, kind: StackKind, segment_ids: Array,
                               key_mask: Array | None) -> Array:
    """Self-attention bias of packed rows -> [B, heads, S, S] float32: visibility within a segment
    (`segment_ids` [B, S]), causal in the decoder, plus the relative position bias.

    A segment's positions are its tokens' indices minus the segment's start, so key_pos - query_pos equals
    the index difference on every visible (same-segment) pair: the buckets are those of the example unpacked,
    computed once from the indices, [1, heads, S, S] (as t5x does), rather than per row from the positions
    (B times the bucket gathers, and a scatter-add of that size in the gradient).
    """
    order = jnp.arange(segment_ids.shape[1])
    visible = same_segment(segment_ids, segment_ids) & key_padding(key_mask)  # [B, 1, S, S]
    if kind == "decoder":
        visible = visible & causal(order, order)
    return relative_bias(order, order) + visibility_bias(visible)


def segment_capacity_keep(expert_index: Array, positions: Array, num_experts: int, capacity: int) -> Array:
    """`keep` [B, S] of packed rows with the expert capacity counted per segment, so that each example keeps
    the tokens it would keep alone in a row (earlier tokens of the segment win, as in `routing.decide`).

    expert_index [B, S]; positions [B, S] count 0, 1, ... from each segment's first token (padding: 0).
    """
    b, s = expert_index.shape
    onehot = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.int32)  # [B, S, E]
    priority = jnp.cumsum(onehot, axis=1)  # [B, S, E] tokens of each expert up to and including each token
    before = jnp.concatenate([jnp.zeros((b, 1, num_experts), jnp.int32), priority[:, :-1]], axis=1)  # [B, S, E]
    start = jnp.arange(s)[None, :] - positions  # [B, S] index of each token's segment start
    offset = jnp.take_along_axis(before, jnp.broadcast_to(start[:, :, None], before.shape), axis=1)  # [B, S, E]
    return jnp.sum((priority - offset) * onehot, axis=-1) <= capacity


def lm_logits(hidden: Array, shared: Array, lm_head: Array | None, d_model: int) -> Array:
    """hidden [B, T, d] -> logits [B, T, V] float32; tied (lm_head None): scaled by d_model**-0.5."""
    hidden = hidden.astype(jnp.float32)
    if lm_head is None:
        return (hidden * d_model ** -0.5) @ shared.T
    return hidden @ lm_head


def router_loss(config: SwitchConfig, aux: ModelAux) -> Array:
    """z_coef * (enc_z + dec_z) + aux_coef * (enc_lb + dec_lb), as HF adds to the task loss."""
    return (config.router_z_loss_coef * (aux.encoder_z_loss + aux.decoder_z_loss)
            + config.router_aux_loss_coef * (aux.encoder_aux_loss + aux.decoder_aux_loss))


def abstract_model(config: SwitchConfig) -> SwitchTransformer:
    """The model's structure with shape-only leaves (nothing allocated): `nnx.eval_shape`."""
    return nnx.eval_shape(lambda: SwitchTransformer(config, rngs=nnx.Rngs(0)))


def param_shapes(config: SwitchConfig) -> dict[tuple, tuple[int, ...]]:
    """Flat param path -> shape, without allocating."""
    state = nnx.state(abstract_model(config), nnx.Param)
    return {path: tuple(v.get_value().shape) for path, v in nnx.to_flat_state(state)}


EXPERTS_ON = ("device", "host")


def is_expert_param(path: tuple) -> bool:
    """Whether a flat param path names an expert stack (`Experts.wi` [E, d, ff] or `Experts.wo` [E, ff, d])."""
    return len(path) >= 2 and path[-2] == "experts" and path[-1] in ("wi", "wo")


def host_memory_kind(device: jax.Device | None = None) -> str:
    """The memory kind expert stacks are kept in on `device` when they stay off it: pinned host memory where
    the device has it (GPU, TPU and the CPU backend do), else the device's default memory. The inference
    engine (`pregated_jax.engine.placement.Memories`) uses the same kind."""
    device = device or jax.devices()[0]
    kinds = {m.kind for m in device.addressable_memories()}
    return "pinned_host" if "pinned_host" in kinds else device.default_memory().kind


def expert_memory_kind(experts_on: str, device: jax.Device | None = None) -> str | None:
    """The loaders' `experts_on` as a memory kind for `materialize`: "device" -> None (the default memory, as
    every other param), "host" -> `host_memory_kind`."""
    if experts_on not in EXPERTS_ON:
        raise ValueError(f"experts_on must be one of {', '.join(EXPERTS_ON)}, got {experts_on!r}")
    return host_memory_kind(device) if experts_on == "host" else None


def loaded_param_dtype(config: SwitchConfig, path: tuple, expert_memory_kind: str | None) -> np.dtype:
    """The dtype a loader reads a param into: an expert stack bound for host memory in the compute dtype
    (`config.dtype`; the engine computes in it, and a bfloat16 model's stacks then take half of float32's host
    bytes), every other param in float32 (the master weights)."""
    if expert_memory_kind is not None and is_expert_param(path):
        return np.dtype(jnp.dtype(config.dtype))
    return np.dtype(np.float32)


def materialize(model: SwitchTransformer, params: dict[tuple, Array], seed: int = 0,
                expert_memory_kind: str | None = None, release: bool = False) -> SwitchTransformer:
    """Fills an abstract model (see `abstract_model`) in place with `params` (flat path -> array) and
    fresh RNG state seeded from `seed`; returns it in eval mode. Every param must be given, with its
    declared shape.

    Params go to the default device's default memory, except expert stacks (`is_expert_param`, plain or
    `QuantizedExperts`) when `expert_memory_kind` is given (e.g. "pinned_host", `host_memory_kind`): those are
    put straight into that memory of the default device, so a numpy stack never passes through device memory.
    The inference engine takes such stacks as they are; other uses (calling the model) are up to the backend.
    `release=True` (for loaders) removes each entry from `params` once it is placed, so host copies read from a
    file are freed one by one: host memory peaks near the model's size instead of twice it."""
    target = None
    if expert_memory_kind is not None:
        device = jax.devices()[0]
        kinds = sorted(m.kind for m in device.addressable_memories())
        if expert_memory_kind not in kinds:
            raise ValueError(f"expert_memory_kind {expert_memory_kind!r} is not a memory of {device} "
                             f"(it has {', '.join(kinds)})")
        target = SingleDeviceSharding(device, memory_kind=expert_memory_kind)
    state = nnx.state(model)
    flat = dict(nnx.to_flat_state(state))
    expected = {p for p, v in flat.items() if isinstance(v, nnx.Param)}
    missing, unexpected = sorted(expected - set(params), key=str), sorted(set(params) - expected, key=str)
    if missing or unexpected:
        raise ValueError(f"params do not fit the model: missing {['.'.join(map(str, p)) for p in missing]}, "
                         f"unexpected {['.'.join(map(str, p)) for p in unexpected]}")
    out, base = {}, jax.random.key(seed)
    for i, (path, var) in enumerate(flat.items()):
        if isinstance(var, nnx.Param):
            given = params.pop(path) if release else params[path]
            if target is not None and is_expert_param(path):
                value = put_on_host(given, target, ".".join(map(str, path)))
            else:
                value = jax.tree.map(jnp.asarray, given)  # an array, or a quantized expert stack's leaves
            del given  # with release: the last reference to the host copy
            want = var.get_value().shape
            if value.shape != want:
                raise ValueError(f"param {'.'.join(map(str, path))}: expected shape {want}, got {value.shape}")
        elif isinstance(var, nnx.RngKey):
            value = jax.random.fold_in(base, i)
        elif isinstance(var, nnx.RngCount):
            value = jnp.zeros((), jnp.uint32)
        else:
            raise TypeError(f"cannot materialize {type(var).__name__} at {path}")
        out[path] = var.replace(value)
    nnx.update(model, nnx.from_flat_state(out))
    model.eval()
    return model


def require_finite(tensors, where: str, error: type[Exception] = ValueError) -> None:
    """Raises `error` (a ValueError by default) naming the first floating tensor that holds a NaN or an
    infinity, how many of its values do, and `where` (the file or checkpoint it was read from).

    tensors: (name, array) pairs or a {name: array} mapping; numpy or jax arrays (checked where they live,
    with one host transfer of a flag per tensor). Non-float tensors are skipped."""
    items = list(tensors.items() if isinstance(tensors, dict) else tensors)
    floats = [(n, x) for n, x in items if jnp.issubdtype(x.dtype, jnp.inexact)]
    flags = [np.isfinite(x).all() if isinstance(x, np.ndarray) else jnp.isfinite(x).all() for _, x in floats]
    for (name, x), ok in zip(floats, jax.device_get(flags)):
        if not ok:
            bad = int(np.count_nonzero(~np.isfinite(np.asarray(x, np.float32))))
            raise error(f"{where}: tensor {name!r} holds {bad} non-finite value(s) (NaN or infinity) "
                        f"of {int(np.size(x))}; refusing to load it")
