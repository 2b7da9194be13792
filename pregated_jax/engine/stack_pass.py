"""One pass through a stack's blocks with experts in host memory: the engine's block loop.

For every MoE block the pass holds one expert source (`sources`), decided ahead of the block by the
mode's schedule (`schedule`) or right after the block's gate, and turns it into a device slot table
just before the block's experts compute (`StackPass.apply_experts`). Copies are started (dispatched
asynchronously) before the computation they should overlap, through the pass's `fetch.CopyQueue`, which
orders them on the copy engine.
"""

from __future__ import annotations

import dataclasses

import jax

from pregated_jax.engine import cache as C
from pregated_jax.engine import fetch as F
from pregated_jax.engine import guess as G
from pregated_jax.engine import sources as S
from pregated_jax.engine.context import RunContext
from pregated_jax.engine.mesh_layout import EXPERT
from pregated_jax.engine.placement import StackProgram
from pregated_jax.engine.stats import Stopwatch
from pregated_jax.moe import ExpertSlots


class StackPass:
    """The blocks of stack `sp` over hidden states shaped like `x` [rows, len, d], for `engine`."""

    def __init__(self, engine, run: RunContext, sp: StackProgram, x):
        self.engine, self.run, self.sp = engine, run, sp
        tokens = x.shape[0] * x.shape[1]
        self.k = min(engine.num_experts, tokens)  # slots a routed copy needs: at most one per token (and expert)
        # the call needs most experts of a block (prefill), or its routed tables would not fit the device
        # budget: either way whole blocks are copied, in chunks under a budget. Judged over all E experts, so
        # that on a mesh (where a device holds E / expert of them) every device decides as one device would.
        e = engine.model_config.num_experts
        self.dense = 2 * min(e, tokens) >= e or engine.tables_exceed_budget(self.k)
        self.capacity = engine.model_config.capacity(x.shape[1])
        # on a mesh, each device copies and computes only its own experts (`mesh_layout`)
        self.layout = engine.layout

    def __call__(self, x, bias, *, cross=None, cross_bias=None, caches=None, cache_index=None):
        """Runs every block. -> (final-normed hidden, new self-attention caches or None)."""
        sp, run, schedule = self.sp, self.run, self.engine.schedule
        moe = sp.moe_blocks
        ahead = {moe[0]: schedule.first(self, sp)} if moe else {}  # MoE block -> source decided before it
        decision, new_caches = None, []
        for i, block in enumerate(sp.blocks):
            cache = None if caches is None else caches[i]
            cross_i = None if cross is None else cross[i]
            if not block.is_sparse:
                x, h, _, _, cache = block.attend_and_route(x, bias, None, cross_i, cross_bias, cache, cache_index)
                x = block.ffn_output(x, h, None, None)
                new_caches.append(cache)
                continue
            j = moe.index(i)
            nxt = moe[j + 1] if j + 1 < len(moe) else None
            started = Stopwatch(wait=x) if run.profile_blocks else None
            if nxt is not None:
                ahead[nxt] = schedule.before_attention(self, sp, nxt)
            x, h, decision, next_decision, cache = block.attend_and_route(
                x, bias, decision, cross_i, cross_bias, cache, cache_index)
            new_caches.append(cache)
            # The next block's copies start before this block's experts compute, once the blocks before this
            # one are done (their expert buffers freed): at most two blocks' experts in flight.
            _backpressure(x)
            source = ahead.pop(i, None)
            if source is None:  # started now, so these copies queue before the next block's
                source = self._at_gate(i, j, decision)
            if nxt is not None and ahead[nxt] is None:
                ahead[nxt] = schedule.after_gate(self, sp, nxt, h, next_decision)
            if run.guess is not None and G.starts_next_at(j, len(moe)):
                run.add_copied(run.guess.start_next(run.queue, self.engine.copy_method, sp.blocks[moe[0]]))
            x = self.apply_experts(i, x, h, decision, source)
            decision = next_decision
            if run.track_memory:
                run.sample_memory(self.engine.mem.device)
            if started is not None:
                run.moe_block_s.append(started.lap(x))
        return sp.final_norm(x), (None if caches is None else new_caches)

    # --- sources, as the schedules ask for them -------------------------------------------------------
    def prefetch(self, sp, i, decision, *, exact: bool):
        """Starts copying block i's experts for a decision made before its gate: a pre-gate's (`exact`) or
        a prediction. -> the block's source, or None to decide after its gate."""
        engine, run = self.engine, self.run
        decision = self._mine(decision, i)
        if self.dense and engine.chunk < engine.num_experts:
            return None  # bounded buffers: streamed after the gate
        if self.dense and not engine.dense_routed_only:
            return self.copy_whole(sp, i)
        if engine.cache_slots is not None:
            self._cache_lookup(i, F.needed_experts_jit(decision, self.k))
            return S.Cached(decision, exact)
        pending, copied = run.queue.start(engine.copy_method, sp.blocks[i], decision, self.k, compact=self.dense)
        run.add_copied(copied)
        return S.Prefetched(pending) if exact else S.Predicted(pending)

    def copy_whole(self, sp, i) -> S.WholeBlock:
        """Copies every expert of block i (XLA's copy of one contiguous range)."""
        b = sp.blocks[i]
        self.run.add_copied(self.engine.num_experts)
        return S.WholeBlock(F.fetch_all(b.host_wi, b.host_wo, self.engine.mem.on_device))

    def source_after_gate(self, sp, i, decision):
        """The source of a block that has none once its gate has run."""
        engine = self.engine
        decision = self._mine(decision, i)
        if self.dense and not engine.dense_routed_only:
            return S.Streamed()
        if engine.cache_slots is not None:
            return S.Cached(None, exact=False)
        pending, copied = self.run.queue.start(engine.copy_method, sp.blocks[i], decision, self.k,
                                               compact=self.dense)
        self.run.add_copied(copied)
        return S.AfterGate(pending)

    def _at_gate(self, i, j, decision):
        run = self.run
        if j == 0 and run.guess is not None:  # the decoder's first MoE block, in a step that guessed
            source, copied = run.guess.at_gate(run.queue, self.engine.miss_copy_method, self.sp.blocks[i],
                                               decision, self.k)
            run.add_copied(copied)
            return source
        return self.engine.schedule.at_gate(self, self.sp, i, decision)

    # --- the source turned into expert weights --------------------------------------------------------
    def apply_experts(self, i, x, h, decision, source: S.Source):
        """Block i's MoE sublayer with its experts taken from `source`. -> x."""
        b, run, queue = self.sp.blocks[i], self.run, self.run.queue
        if self.engine.config.record_routing:
            run.add_routed(self.engine.moe_number[(self.sp.kind, i)], decision)
        decision = self._mine(decision, i)
        match source:
            case S.Resident():  # the "host" stacks are on the device
                slots = ExpertSlots(b.host_wi, b.host_wo, None)
            case S.WholeBlock(slots):
                pass
            case S.Streamed():
                return self._stream(b, x, h, decision)
            case S.Prefetched(pending) | S.AfterGate(pending):
                slots = queue.finish(pending, x)
            case S.Predicted(pending):
                slots = queue.finish(pending, x)
                run.add_speculation(F.overlap(self._needed(decision), slots.expert_ids))
                slots = F.merge_slots(slots, self._copy_missed(b, decision, slots.expert_ids))
            case S.Guessed(missed):
                guessed = run.guess.take(queue, x)
                run.add_speculation(F.overlap(self._needed(decision), guessed.expert_ids))
                slots = F.merge_slots(guessed, queue.finish(missed, x))
            case S.Cached(ahead, exact) if exact:  # the lookup for this very decision already ran
                slots = run.caches[(self.sp.kind, i)].slots
            case S.Cached(ahead, _):
                needed = self._needed(decision)
                if ahead is not None:  # a prediction's copies went into the cache: none is wasted
                    run.add_speculation(F.overlap(needed, F.needed_experts_jit(ahead, self.k)).at[2].set(0))
                slots = self._cache_lookup(i, needed).slots
            case _:
                raise TypeError(f"not an expert source: {source!r}")
        return b.ffn_output(x, h, decision, self._shared(slots))

    def _mine(self, decision, i):
        """Block i's decision as this device sees it: on a mesh, only its own experts' tokens (local ids)."""
        return (decision if self.layout is None
                else self.layout.local_decision(decision, self.sp.blocks[i].phys_of_logical))

    def _shared(self, slots: ExpertSlots) -> ExpertSlots:
        """On a mesh, marks a table as this device's share: the devices' outputs are summed over `expert`."""
        return slots if self.layout is None else dataclasses.replace(slots, sum_over=EXPERT)

    def _needed(self, decision):
        return F.needed_experts_jit(decision, self.k)

    def _copy_missed(self, b, decision, present):
        """Copies the experts `decision` needs that are not in `present` [g], after the gate."""
        engine = self.engine
        method = engine.copy_method if self.dense else engine.miss_copy_method
        pending, copied = self.run.queue.start(method, b, decision, self.k, present, compact=self.dense)
        self.run.add_copied(copied)
        return self.run.queue.finish(pending)

    def _cache_lookup(self, i, needed) -> C.CacheState:
        key, b, engine = (self.sp.kind, i), self.sp.blocks[i], self.engine
        self.run.caches[key] = C.cache_lookup(self.run.caches[key], b.host_wi, b.host_wo, needed,
                                              engine.config.cache_policy, engine.mem.on_device)
        return self.run.caches[key]

    def _stream(self, b, x, h, decision):
        """Every expert, after the gate, in contiguous chunks through a bounded buffer; each next chunk's
        copy is issued before the current chunk computes."""
        e, chunk, device = self.engine.num_experts, self.engine.chunk, self.engine.mem.on_device
        starts = list(range(0, e, chunk))
        size = lambda s: min(chunk, e - s)  # noqa: E731
        current = F.fetch_range(b.host_wi, b.host_wo, starts[0], size(starts[0]), device)
        for n, s in enumerate(starts):
            self.run.add_copied(size(s))
            _backpressure(x)  # chunk n-1 consumed: its buffer is free before chunk n+1 is allocated
            upcoming = (F.fetch_range(b.host_wi, b.host_wo, starts[n + 1], size(starts[n + 1]), device)
                        if n + 1 < len(starts) else None)
            x = b.ffn_output(x, h, decision, self._shared(current))  # residual chaining sums the chunks' outputs
            current = upcoming
        return x


def _backpressure(x):
    """Waits for x outside a trace (asynchronous dispatch would otherwise allocate every copy up front);
    inside the traced decode step XLA schedules copies and frees buffers itself."""
    if not isinstance(x, jax.core.Tracer):
        jax.block_until_ready(x)
