"""Moving experts host -> device, driven by routing decisions that stay on the device.

Two copy methods fill the same slot tables (a `CopyQueue` starts and finishes them):
- "xla": a jitted `dynamic_index_in_dim` on the pinned-host stack selects what to copy, and XLA copies it
  with a kernel that reads host memory. Copies are skipped with `lax.cond` for empty slots. The index
  never leaves the device, but these kernels run in series with the computation.
- "dma": the native custom calls (`pregated_jax.native`): the start reads the ids once the compute stream
  has produced them and queues copy-engine transfers on a separate stream; the finish makes the compute
  stream wait for them on the device (not at all when nothing was copied). Whatever runs in between
  overlaps the copies.
Whole blocks and ranges (`fetch_range`, `fetch_all`) are always XLA copies. Every function that copies
returns how many experts it copied, as a device scalar, for the statistics.

Expert stacks are plain arrays or `quant.QuantizedExperts` (values and scales, each stacked on E): every
operation here is one leading-axis operation mapped over the leaves of (wi, wo), and the native copies
take one host stack per leaf.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import SingleDeviceSharding

from pregated_jax import native
from pregated_jax.moe import ExpertSlots
from pregated_jax.routing import RouterDecision

Array = jax.Array
COPY_METHODS = ("xla", "dma")


def needed_experts(decision: RouterDecision, k: int) -> Array:
    """Distinct experts of the kept tokens, ascending, padded with -1 -> [k] int32."""
    e = decision.num_experts
    index = jnp.where(decision.keep, decision.expert_index, e).reshape(-1)  # E marks dropped tokens
    unique = jnp.unique(index, size=k + 1, fill_value=e)[:k]  # real ids sort before the marker
    return jnp.where(unique < e, unique, -1).astype(jnp.int32)


def _copy_slice(host_wi, host_wo, expert, device: SingleDeviceSharding):
    """Expert `expert`'s weights from host memory to the device -> (wi [d, ff], wo [ff, d])."""
    return jax.tree.map(
        lambda stack: jax.device_put(jax.lax.dynamic_index_in_dim(stack, expert, keepdims=False), device),
        (host_wi, host_wo))


def zero_tables(host_wi, host_wo, k: int | None, device: SingleDeviceSharding):
    """Zeroed device tables shaped like k experts of the stacks (k None: one expert, no leading axis)."""
    lead = () if k is None else (k,)
    return jax.tree.map(lambda stack: jax.device_put(jnp.zeros(lead + stack.shape[1:], stack.dtype), device),
                        (host_wi, host_wo))


def copy_expert(host_wi, host_wo, expert, device: SingleDeviceSharding):
    """One expert's weights from host memory to the device, or zeros (no copy) when expert < 0."""

    def skip(_):
        return zero_tables(host_wi, host_wo, None, device)

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
    pairs = [copy_expert(host_wi, host_wo, ids[j], device) for j in range(ids.shape[0])]
    return jax.tree.map(lambda *rows: jnp.stack(rows), *pairs)


# `compact` (prefill) copies in a loop over the routed experts only: with ~half of 128 experts routed, one
# `lax.cond` per slot costs a third more time than the loop (docs/design.md, "Prefill copies").
def _valid_first(ids):
    """ids [k] with -1 entries -> the same ids, valid ones first (stable), -1 after them."""
    order = jnp.argsort(ids < 0, stable=True)
    return ids[order]


def _copy_valid_slots(host_wi, host_wo, ids, device):
    """ids [k], valid first: copies exactly the valid ones, slot j <- expert ids[j]; the rest stay 0."""

    def copy_one(j, tables):
        new = _copy_slice(host_wi, host_wo, ids[j], device)
        return jax.tree.map(lambda table, row: jax.lax.dynamic_update_index_in_dim(table, row, j, 0), tables, new)

    return jax.lax.fori_loop(0, jnp.sum(ids >= 0), copy_one, zero_tables(host_wi, host_wo, ids.shape[0], device))


# --- the two copy methods behind one interface ------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Staging:
    """Where a staged "dma" fetch lands: the native library's staging area `key` (`native.stage_start`),
    for a block's host stacks (`stacks`, one per leaf of (wi, wo), regrouped by `layout`)."""

    key: int
    stacks: tuple
    layout: Any


@struct.dataclass
class PendingSlots:
    """A slot table on its way to the device: read it only through `CopyQueue.finish` / `finish_fetch`.

    token: for "dma", a scalar produced by the start; a later start or finish that takes it as an operand
    is ordered after this start. None for "xla", whose tables are ordinary values.
    staging: for a staged fetch, where its rows land; its `slots` then hold only the ids (wi, wo None) until
    the finish copies the rows out. Nothing in flight is an XLA buffer, so it may cross a loop iteration or a
    dispatch.
    """

    slots: ExpertSlots
    token: Array | None = None
    staging: Staging | None = struct.field(pytree_node=False, default=None)


class CopyQueue:
    """The copies of one pass through a stack, in the order they reach the copy engine.

    "dma" copies run in the order their starts do, but XLA orders independent custom calls inside a traced
    step as it likes. So inside a trace every start takes the previous start's token (its copies queue
    behind the earlier ones), and every finish takes the tokens of the starts made after the fetch it waits
    for: those starts are issued before the wait, so their copies overlap the computation that comes before
    the table's use. Outside a trace, dispatch order is the order, and tokens are not passed.

    first: a fetch started before this pass (a decode step's incoming first-block guess), which the pass's
    own copies queue behind.
    """

    def __init__(self, device: SingleDeviceSharding, first: PendingSlots | None = None):
        self.device = device
        self._started: list[PendingSlots] = [] if first is None else [first]

    def start(self, method: str, block, decision: RouterDecision, k: int, exclude: Array | None = None, *,
              compact: bool = False):
        """Starts copying the experts `decision` needs into a fresh k-slot table (see `fetch_decision`).

        block: anything with `host_wi`, `host_wo` (the [E, ...] host stacks) and `host_stacks` (a
        `native.HostStack` per leaf of the two, for "dma"). -> (PendingSlots, experts copied [int32]).
        """
        if method == "xla":
            slots, copied = fetch_decision(block.host_wi, block.host_wo, decision, k, self.device, exclude,
                                           compact=compact)
            return self._record(PendingSlots(slots)), copied
        _check_method(method)
        pending, copied = _dma_start(block.host_stacks, _layout(block), decision, k, exclude, self._behind())
        return self._record(pending), copied

    def start_ids(self, method: str, block, ids: Array, *, staging: int | None = None, after: tuple = ()):
        """Starts copying experts `ids` [k] (-1: an empty slot), chosen before the block's gate runs.

        staging ("dma" only): a `native.new_staging_key()`; the rows land in that staging area (see
        `PendingSlots`), and `after` must hold a value the area's last finish produced.
        -> (PendingSlots, experts copied)."""
        if method == "xla":
            slots, copied = fetch_ids(block.host_wi, block.host_wo, ids, self.device)
            return self._record(PendingSlots(slots)), copied
        _check_method(method)
        if staging is not None:
            where = Staging(staging, tuple(block.host_stacks), _layout(block))
            pending, copied = _stage_start_ids(where, ids, (*self._behind(), *after))
        else:
            pending, copied = _dma_start_ids(block.host_stacks, _layout(block), ids, self._behind())
        return self._record(pending), copied

    def finish(self, pending: PendingSlots, *after) -> ExpertSlots:
        """The table, safe to read. after: values (inside a trace) the wait must follow, so that it sits just
        before the table's use; the starts made after `pending` are added here."""
        later = self._started[self._index(pending) + 1:]
        return finish_fetch(pending, *after, *(p.token for p in later if _traced(p.token)))

    def _behind(self) -> tuple:
        last = self._started[-1].token if self._started else None
        return (last,) if _traced(last) else ()

    def _record(self, pending: PendingSlots) -> PendingSlots:
        self._started.append(pending)
        return pending

    def _index(self, pending: PendingSlots) -> int:
        for n, p in enumerate(self._started):
            if p is pending:
                return n
        raise ValueError("finish() got a fetch this queue did not start")


def _layout(block):
    """The tree structure of a block's (wi, wo): how the native copies' flat tables regroup."""
    return jax.tree.structure((block.host_wi, block.host_wo))


def _traced(token) -> bool:
    return isinstance(token, jax.core.Tracer)


def _check_method(method: str):
    if method != "dma":
        raise ValueError(f"unknown copy method {method!r}; choose one of {COPY_METHODS}")


@functools.partial(jax.jit, static_argnums=(0, 1, 3))
def _dma_start(stacks, layout, decision, k, exclude, after):
    ids = _ids_to_copy(decision, k, exclude)  # [k] ascending: consecutive experts become one transfer
    return _dma_start_ids(stacks, layout, ids, after)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _dma_start_ids(stacks, layout, ids, after):
    tables, token = native.fetch_start(ids, list(stacks), *after)  # one table per leaf of (wi, wo)
    wi, wo = jax.tree.unflatten(layout, tables)
    return PendingSlots(ExpertSlots(wi, wo, ids), token), jnp.sum(ids >= 0).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def _stage_start_ids(where: Staging, ids, after):
    token = native.stage_start(ids, list(where.stacks), where.key, *after)
    return (PendingSlots(ExpertSlots(None, None, ids), token, where),  # the rows are in the staging area
            jnp.sum(ids >= 0).astype(jnp.int32))


def finish_fetch(pending: PendingSlots, *after) -> ExpertSlots:
    """The table, safe to read. `after` (inside a traced step): values the wait must come after."""
    if pending.staging is not None:
        return _stage_done(pending, *after) if _traced(pending.token) else _stage_finish(pending)
    if pending.token is None:
        return pending.slots
    if _traced(pending.token):
        return _dma_done(pending, *after)
    return _dma_finish(pending)


def _stage_done(pending: PendingSlots, *after) -> ExpertSlots:
    where, ids = pending.staging, pending.slots.expert_ids
    tables = native.stage_done(ids, pending.token, list(where.stacks), where.key, *after)
    wi, wo = jax.tree.unflatten(where.layout, tables)
    return ExpertSlots(wi, wo, ids)


_stage_finish = jax.jit(_stage_done)


def _dma_done(pending, *after):
    tables, layout = jax.tree.flatten((pending.slots.wi, pending.slots.wo))
    tables = native.fetch_done(tables, pending.slots.expert_ids, pending.token, *after)
    wi, wo = jax.tree.unflatten(layout, tables)
    return ExpertSlots(wi, wo, pending.slots.expert_ids)


_dma_finish = jax.jit(_dma_done, donate_argnums=0)  # donated: the tables' buffers pass through without a copy


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def fetch_range(host_wi, host_wo, start: int, size: int, device: SingleDeviceSharding) -> ExpertSlots:
    """A contiguous range of experts [start, start + size) in one copy (full-bandwidth path)."""
    wi, wo = jax.tree.map(lambda stack: jax.device_put(jax.lax.slice_in_dim(stack, start, start + size), device),
                          (host_wi, host_wo))
    return ExpertSlots(wi, wo, jnp.arange(start, start + size, dtype=jnp.int32))


def fetch_all(host_wi, host_wo, device: SingleDeviceSharding) -> ExpertSlots:
    """The whole stack (prefetch-all, or gpu-only's resident copy)."""
    return fetch_range(host_wi, host_wo, 0, host_wi.shape[0], device)


def merge_slots(a: ExpertSlots, b: ExpertSlots) -> ExpertSlots:
    return _merge(a, b)


@jax.jit
def _merge(a, b):
    return jax.tree.map(lambda x, y: jnp.concatenate([x, y]), a, b)


needed_experts_jit = jax.jit(needed_experts, static_argnums=1)


@jax.jit
def overlap(needed: Array, available: Array) -> Array:
    """How well a guess `available` [g] covered `needed` [k] (-1 entries ignored) -> [3] int32: (needed
    experts found, experts needed, guessed experts not needed: copied in vain)."""
    valid = needed >= 0
    match = (needed[:, None] == available[None, :]) & valid[:, None]  # [k, g]
    found, used = jnp.any(match, axis=1), jnp.any(match, axis=0)
    unused = (available >= 0) & ~used
    return jnp.stack([jnp.sum(found), jnp.sum(valid), jnp.sum(unused)]).astype(jnp.int32)
