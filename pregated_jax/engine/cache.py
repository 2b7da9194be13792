"""The device expert cache: per MoE block, a table of expert slots kept on the device across decode steps
and requests, with its replacement bookkeeping (LRU, LFU, LIFO, FIFO) computed on the device too, so a
lookup never waits for the host. `cache_sim.ExpertCacheSim` is the pure-Python reference the tests
compare it with.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import SingleDeviceSharding

from pregated_jax.engine.fetch import copy_expert, zero_tables
from pregated_jax.moe import ExpertSlots

Array = jax.Array
POLICIES = ("lru", "lfu", "lifo", "fifo")


@struct.dataclass
class CacheState:
    """One MoE block's device slot table and its bookkeeping (all on the device)."""

    slots: ExpertSlots  # wi [C, d, ff], wo [C, ff, d] (in the engine's expert format), expert_ids [C] (-1: empty)
    last_use: Array  # [C] int32 clock of the last access that needed the slot's expert
    freq: Array  # [C] int32 accesses that needed it since it was inserted
    inserted: Array  # [C] int32 clock of insertion
    clock: Array  # [] int32, +1 per access
    hits: Array  # [] int32
    misses: Array  # [] int32


def empty_cache(capacity: int, host_wi, host_wo, device: SingleDeviceSharding) -> CacheState:
    return _empty_cache(host_wi, host_wo, capacity, device)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _empty_cache(host_wi, host_wo, capacity, device):
    wi, wo = zero_tables(host_wi, host_wo, capacity, device)
    slots = ExpertSlots(wi, wo, jnp.full((capacity,), -1, jnp.int32))
    zeros = jnp.zeros((capacity,), jnp.int32)
    return CacheState(slots, zeros, zeros, zeros, jnp.int32(0), jnp.int32(0), jnp.int32(0))


def _victim(ids, last_use, freq, inserted, protected, policy: str):
    """Slot to fill: the lowest empty slot, else the policy's choice among unprotected slots."""
    empty = ids < 0
    big = jnp.iinfo(jnp.int32).max
    if policy == "lru":
        score = last_use
    elif policy == "lfu":
        score = freq * (2 ** 20) + last_use  # frequency first, then recency (clock < 2**20)
    elif policy == "lifo":
        score = -inserted
    else:  # fifo
        score = inserted
    score = jnp.where(protected, big, score)
    return jnp.where(jnp.any(empty), jnp.argmax(empty), jnp.argmin(score)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(4, 5), donate_argnums=0)
def cache_lookup(state: CacheState, host_wi, host_wo, needed: Array, policy: str,
                 device: SingleDeviceSharding) -> CacheState:
    """Makes every expert in `needed` [k] (ascending, -1 padded) resident, copying only misses."""
    t = state.clock + 1
    valid = needed >= 0

    def plan(carry, e):
        ids, last_use, freq, inserted = carry
        present = ids == e
        hit = jnp.any(present) & (e >= 0)
        protected = jnp.any(ids[:, None] == jnp.where(valid, needed, -2)[None, :], axis=-1)
        slot = jnp.where(hit, jnp.argmax(present), _victim(ids, last_use, freq, inserted, protected, policy))
        miss = (e >= 0) & ~hit
        upd = lambda a, v: jnp.where(e >= 0, a.at[slot].set(v), a)  # noqa: E731
        ids = upd(ids, e)
        last_use = upd(last_use, t)
        freq = jnp.where(miss, freq.at[slot].set(1), upd(freq, freq[slot] + 1))
        inserted = jnp.where(miss, inserted.at[slot].set(t), inserted)
        return (ids, last_use, freq, inserted), (slot, jnp.where(miss, e, -1))

    meta = (state.slots.expert_ids, state.last_use, state.freq, state.inserted)
    (ids, last_use, freq, inserted), (slots, copies) = jax.lax.scan(plan, meta, needed)

    def copy_one(j, tables):
        new = copy_expert(host_wi, host_wo, copies[j], device)
        fill = copies[j] >= 0

        def put(table, row):
            return jax.lax.dynamic_update_index_in_dim(table, jnp.where(fill, row, table[slots[j]]), slots[j], 0)

        return jax.tree.map(put, tables, new)

    wi, wo = jax.lax.fori_loop(0, needed.shape[0], copy_one, (state.slots.wi, state.slots.wo))
    n_miss = jnp.sum(copies >= 0).astype(jnp.int32)
    return CacheState(ExpertSlots(wi, wo, ids), last_use, freq, inserted, t,
                      state.hits + jnp.sum(valid).astype(jnp.int32) - n_miss, state.misses + n_miss)


