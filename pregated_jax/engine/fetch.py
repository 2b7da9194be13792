"""Moving experts host -> device, driven by device-resident routing decisions.

Two copy methods fill the same slot tables (`start_fetch` / `finish_fetch`):
- "xla": a jitted `dynamic_index_in_dim` on the pinned-host stack selects what to copy, and XLA copies it
  with a kernel that reads host memory. Copies are skipped with `lax.cond` for empty slots and cache hits.
  No host round trip (which would serialize the pipeline; NOTES.md §3), but on an H100 these kernels run
  in series with the computation (docs/benchmarks/h100-copy-overlap).
- "dma": the native custom calls (`pregated_jax.native`): the start reads the ids once the compute stream
  has produced them and queues copy-engine transfers on a separate stream; the finish makes the compute
  stream wait for them on the device (not at all when nothing was copied). Whatever runs in between
  overlaps the copies.
Every function returns how many experts it copied, as a device scalar, for the statistics.

The device expert cache is a per-MoE-block slot table whose bookkeeping (LRU, LFU, LIFO, FIFO) runs on
the device as well; `cache_sim.ExpertCacheSim` is its pure-Python reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import SingleDeviceSharding

from pregated_jax import native
from pregated_jax.moe import ExpertSlots
from pregated_jax.routing import RouterDecision

Array = jax.Array
POLICIES = ("lru", "lfu", "lifo", "fifo")
COPY_METHODS = ("xla", "dma")


def needed_experts(decision: RouterDecision, k: int) -> Array:
    """Distinct experts of the kept tokens, ascending, padded with -1 -> [k] int32."""
    e = decision.num_experts
    index = jnp.where(decision.keep, decision.expert_index, e).reshape(-1)  # E marks dropped tokens
    unique = jnp.unique(index, size=k + 1, fill_value=e)[:k]  # real ids sort before the marker
    return jnp.where(unique < e, unique, -1).astype(jnp.int32)


def _copy_slice(host_wi, host_wo, expert, device: SingleDeviceSharding):
    """Expert `expert`'s weights from host memory to the device -> (wi [d, ff], wo [ff, d])."""
    wi = jax.lax.dynamic_index_in_dim(host_wi, expert, keepdims=False)
    wo = jax.lax.dynamic_index_in_dim(host_wo, expert, keepdims=False)
    return jax.device_put(wi, device), jax.device_put(wo, device)


def _copy_expert(host_wi, host_wo, expert, device: SingleDeviceSharding):
    """One expert's weights from host memory to the device, or zeros (no copy) when expert < 0."""

    def skip(_):
        return (jax.device_put(jnp.zeros(host_wi.shape[1:], host_wi.dtype), device),
                jax.device_put(jnp.zeros(host_wo.shape[1:], host_wo.dtype), device))

    return jax.lax.cond(expert >= 0, lambda e: _copy_slice(host_wi, host_wo, e, device), skip, expert)


@functools.partial(jax.jit, static_argnums=(3, 4), static_argnames="compact")
def fetch_decision(host_wi, host_wo, decision: RouterDecision, k: int, device: SingleDeviceSharding,
                   exclude: Array | None = None, *, compact: bool = False):
    """Copies the experts `decision` needs into a fresh k-slot table.

    `exclude` [G] lists experts already on the device (speculative mode: the prefetched ones); they
    are not copied again. `compact` (for large k, prefill) copies the routed experts in a loop over
    how many there are instead of one `lax.cond` per slot. -> (ExpertSlots with ids -1 for unused
    slots, experts copied [int32]).
    """
    return fetch_ids(host_wi, host_wo, _ids_to_copy(decision, k, exclude), device, compact=compact)


@functools.partial(jax.jit, static_argnums=3, static_argnames="compact")
def fetch_ids(host_wi, host_wo, ids: Array, device: SingleDeviceSharding, *, compact: bool = False):
    """Copies experts `ids` [k] (-1: an empty slot) into a fresh k-slot table (see `fetch_decision`)."""
    if compact:
        ids = _valid_first(ids)
        wi, wo = _copy_valid_slots(host_wi, host_wo, ids, device)
    else:
        wi, wo = _copy_each_slot(host_wi, host_wo, ids, device)
    return ExpertSlots(wi, wo, ids), jnp.sum(ids >= 0).astype(jnp.int32)


def _ids_to_copy(decision, k, exclude):
    """needed_experts [k], with the ids in `exclude` (already on the device) replaced by -1."""
    ids = needed_experts(decision, k)
    if exclude is not None:
        ids = jnp.where(jnp.any(ids[:, None] == exclude[None, :], axis=-1), -1, ids)
    return ids


def _copy_each_slot(host_wi, host_wo, ids, device):
    """Slot by slot, a static loop -> wi [k, d, ff], wo [k, ff, d] (zeros in empty slots)."""
    pairs = [_copy_expert(host_wi, host_wo, ids[j], device) for j in range(ids.shape[0])]
    return jnp.stack([p[0] for p in pairs]), jnp.stack([p[1] for p in pairs])


# Why `compact` for prefill: H100, switch-base-128, 256 tokens, 6 encoder MoE blocks of ~56 routed experts
# each: prefill 146 ms copying whole blocks, 130 ms with 128 `lax.cond` slots, 95 ms with the loop
# (docs/benchmarks/h100-copy-overlap/README.md).
def _valid_first(ids):
    """ids [k] with -1 entries -> the same ids, valid ones first (stable), -1 after them."""
    order = jnp.argsort(ids < 0, stable=True)
    return ids[order]


def _copy_valid_slots(host_wi, host_wo, ids, device):
    """ids [k], valid first: copies exactly the valid ones, slot j <- expert ids[j]; the rest stay 0."""

    def copy_one(j, tables):
        wi, wo = tables
        new_wi, new_wo = _copy_slice(host_wi, host_wo, ids[j], device)
        return (jax.lax.dynamic_update_index_in_dim(wi, new_wi, j, 0),
                jax.lax.dynamic_update_index_in_dim(wo, new_wo, j, 0))

    zeros = lambda a: jax.device_put(jnp.zeros((ids.shape[0],) + a.shape[1:], a.dtype), device)  # noqa: E731
    return jax.lax.fori_loop(0, jnp.sum(ids >= 0), copy_one, (zeros(host_wi), zeros(host_wo)))


# --- the two copy methods behind one interface ------------------------------------------------------

@struct.dataclass
class PendingSlots:
    """A slot table on its way to the device: read it only through `finish_fetch`.

    token: for "dma", a scalar produced by the start; a later start or finish that takes it as an operand
    is ordered after this start. None for "xla", whose tables are ordinary values.
    """

    slots: ExpertSlots
    token: Array | None = None


def start_fetch(method: str, host_wi, host_wo, stacks, decision: RouterDecision, k: int,
                device: SingleDeviceSharding, exclude: Array | None = None, *, compact: bool = False,
                after: PendingSlots | None = None):
    """Starts copying the experts `decision` needs into a fresh k-slot table (see `fetch_decision`).

    stacks: the block's (wi, wo) `native.HostStack`s, for "dma". after: inside a traced step, a fetch
    whose copies must go first ("dma" copies run in the order their starts do; XLA orders independent
    starts as it likes). -> (PendingSlots, experts copied).
    """
    if method == "xla":
        slots, copied = fetch_decision(host_wi, host_wo, decision, k, device, exclude, compact=compact)
        return PendingSlots(slots), copied
    _check_method(method)
    traced = after is not None and isinstance(after.token, jax.core.Tracer)
    return _dma_start(stacks, decision, k, exclude, (after.token,) if traced else ())


def start_fetch_ids(method: str, host_wi, host_wo, stacks, ids: Array, device: SingleDeviceSharding,
                    after: PendingSlots | None = None):
    """Starts copying experts `ids` [k] (-1: an empty slot) into a fresh k-slot table: a guess made before
    the block's gate runs (see `start_fetch`). -> (PendingSlots, experts copied)."""
    if method == "xla":
        slots, copied = fetch_ids(host_wi, host_wo, ids, device)
        return PendingSlots(slots), copied
    _check_method(method)
    traced = after is not None and isinstance(after.token, jax.core.Tracer)
    return _dma_start_ids(stacks, ids, (after.token,) if traced else ())


def _check_method(method: str):
    if method != "dma":
        raise ValueError(f"unknown copy method {method!r}; choose one of {COPY_METHODS}")


@functools.partial(jax.jit, static_argnums=(0, 2))
def _dma_start(stacks, decision, k, exclude, after):
    ids = _ids_to_copy(decision, k, exclude)  # [k] ascending: consecutive experts become one transfer
    return _dma_start_ids(stacks, ids, after)


@functools.partial(jax.jit, static_argnums=0)
def _dma_start_ids(stacks, ids, after):
    (wi, wo), token = native.fetch_start(ids, list(stacks), *after)
    return PendingSlots(ExpertSlots(wi, wo, ids), token), jnp.sum(ids >= 0).astype(jnp.int32)


def finish_fetch(pending: PendingSlots, *after) -> ExpertSlots:
    """The table, safe to read. `after` (inside a traced step): values the wait must come after, so
    that it is scheduled just before the table's use, not right after the start."""
    if pending.token is None:
        return pending.slots
    if isinstance(pending.token, jax.core.Tracer):
        return _dma_done(pending, *after)
    return _dma_finish(pending)


def _dma_done(pending, *after):
    wi, wo = native.fetch_done([pending.slots.wi, pending.slots.wo], pending.slots.expert_ids, pending.token,
                               *after)
    return ExpertSlots(wi, wo, pending.slots.expert_ids)


_dma_finish = jax.jit(_dma_done, donate_argnums=0)  # donated: the tables' buffers pass through without a copy


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def fetch_range(host_wi, host_wo, start: int, size: int, device: SingleDeviceSharding) -> ExpertSlots:
    """A contiguous range of experts [start, start + size) in one copy (full-bandwidth path)."""
    wi = jax.device_put(jax.lax.slice_in_dim(host_wi, start, start + size), device)
    wo = jax.device_put(jax.lax.slice_in_dim(host_wo, start, start + size), device)
    return ExpertSlots(wi, wo, jnp.arange(start, start + size, dtype=jnp.int32))


def fetch_all(host_wi, host_wo, device: SingleDeviceSharding) -> ExpertSlots:
    """The whole stack (prefetch-all, or gpu-only's resident copy)."""
    return fetch_range(host_wi, host_wo, 0, host_wi.shape[0], device)


def merge_slots(a: ExpertSlots, b: ExpertSlots) -> ExpertSlots:
    return _merge(a, b)


@jax.jit
def _merge(a, b):
    return ExpertSlots(jnp.concatenate([a.wi, b.wi]), jnp.concatenate([a.wo, b.wo]),
                       jnp.concatenate([a.expert_ids, b.expert_ids]))


# --- the device expert cache --------------------------------------------------------------------

@struct.dataclass
class CacheState:
    """One MoE block's device slot table and its bookkeeping (all on the device)."""

    slots: ExpertSlots  # wi [C, d, ff], wo [C, ff, d], expert_ids [C] (-1: empty)
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
    z = lambda shape, dtype: jax.device_put(jnp.zeros(shape, dtype), device)  # noqa: E731
    slots = ExpertSlots(z((capacity,) + host_wi.shape[1:], host_wi.dtype),
                        z((capacity,) + host_wo.shape[1:], host_wo.dtype),
                        jnp.full((capacity,), -1, jnp.int32))
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
        wi, wo = tables
        new_wi, new_wo = _copy_expert(host_wi, host_wo, copies[j], device)
        fill = copies[j] >= 0
        wi = jax.lax.dynamic_update_index_in_dim(wi, jnp.where(fill, new_wi, wi[slots[j]]), slots[j], 0)
        wo = jax.lax.dynamic_update_index_in_dim(wo, jnp.where(fill, new_wo, wo[slots[j]]), slots[j], 0)
        return wi, wo

    wi, wo = jax.lax.fori_loop(0, needed.shape[0], copy_one, (state.slots.wi, state.slots.wo))
    n_miss = jnp.sum(copies >= 0).astype(jnp.int32)
    return CacheState(ExpertSlots(wi, wo, ids), last_use, freq, inserted, t,
                      state.hits + jnp.sum(valid).astype(jnp.int32) - n_miss, state.misses + n_miss)


needed_experts_jit = jax.jit(needed_experts, static_argnums=1)


@jax.jit
def unused(available: Array) -> Array:
    """A guess `available` [g] that no block read (see `overlap`) -> [3] int32: (0, 0, its experts)."""
    return jnp.stack([0, 0, jnp.sum(available >= 0)]).astype(jnp.int32)


@jax.jit
def overlap(needed: Array, available: Array) -> Array:
    """How well a guess `available` [g] covered `needed` [k] (-1 entries ignored) -> [3] int32: (needed
    experts found, experts needed, guessed experts not needed: copied in vain)."""
    valid = needed >= 0
    match = (needed[:, None] == available[None, :]) & valid[:, None]  # [k, g]
    found, used = jnp.any(match, axis=1), jnp.any(match, axis=0)
    unused = (available >= 0) & ~used
    return jnp.stack([jnp.sum(found), jnp.sum(valid), jnp.sum(unused)]).astype(jnp.int32)
