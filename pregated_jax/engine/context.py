"""The bookkeeping of one pass through a stack: its copy queue, counters, cache states and guess."""

from __future__ import annotations

import jax.numpy as jnp

from pregated_jax.engine.fetch import CopyQueue
from pregated_jax.engine.guess import StepGuess
from pregated_jax.engine.stats import RunStats


class RunContext:
    """One pass (a prefill's encoder, or a decode step's decoder).

    Dispatched block by block it holds device arrays and hands them to the run's statistics
    (`flush_into`); inside the traced decode step it holds tracers, which `totals()` turns into the step's
    outputs. `caches` maps (stack, block) to the device cache's state; `guess` is a decode step's
    first-block guess (`guess.StepGuess`), whose incoming copies this pass's copies queue behind.
    """

    def __init__(self, caches: dict, device, stats: RunStats | None = None, *, track_memory: bool = False,
                 profile_blocks: bool = False, guess: StepGuess | None = None):
        self.caches = dict(caches)
        self.guess = guess
        self.queue = CopyQueue(device, first=None if guess is None else guess.incoming)
        self.copied, self.speculation = [], []
        self.routed: list = []  # (MoE block number, RouterDecision) of each MoE block run, with record_routing
        self.stats, self.track_memory, self.profile_blocks = stats, track_memory, profile_blocks
        self.moe_block_s = stats.moe_block_s if stats is not None else []

    def add_copied(self, n):
        """n: experts copied, a Python int or an int32 device scalar."""
        self.copied.append(n)

    def add_speculation(self, counts):
        """counts [3] int32: (experts a guess or prediction had copied that were needed, needed, wasted)."""
        self.speculation.append(counts)

    def add_routed(self, block: int, decision):
        """decision: MoE block number `block`'s routing (over all E experts), to count (`record_routing`)."""
        self.routed.append((block, decision))

    def routing(self, num_blocks: int, num_experts: int):
        """(tokens [blocks, E], co-activation [blocks, E, E]) int32 of the decisions added (`add_routed`), or None
        without any: co-activation[b, i, j] is 1 where experts i and j both received a token in this pass."""
        if not self.routed:
            return None
        counts = jnp.zeros((num_blocks, num_experts), jnp.int32)
        coactive = jnp.zeros((num_blocks, num_experts, num_experts), jnp.int32)
        for block, decision in self.routed:
            index = jnp.where(decision.keep, decision.expert_index, num_experts).reshape(-1)  # E: dropped
            c = jnp.bincount(index, length=num_experts + 1)[:num_experts].astype(jnp.int32)  # [E]
            active = (c > 0).astype(jnp.int32)  # [E]
            counts = counts.at[block].add(c)
            coactive = coactive.at[block].add(active[:, None] * active[None, :])
        return counts, coactive

    def sample_memory(self, device):
        self.stats.sample_memory(device)

    def next_guess(self, *after):
        """The next decode step's first-block guess, started by this pass and waited for after `after` (None
        without a guess; see `guess.StepGuess.landed`)."""
        return None if self.guess is None else self.guess.landed(self.queue, *after)

    def totals(self):
        """(experts copied, [speculative hits, needed, wasted]) as traced int32 values."""
        copied = sum(jnp.asarray(n, jnp.int32) for n in self.copied) if self.copied else jnp.int32(0)
        spec = sum(self.speculation) if self.speculation else jnp.zeros((3,), jnp.int32)
        return copied, spec

    def flush_into(self, stats: RunStats) -> dict:
        """Hands the counters to `stats`. -> the caches' new states."""
        for n in self.copied:
            stats.add_copied(n)
        for counts in self.speculation:
            stats.add_speculation(counts)
        if self.routed:
            stats.add_routing(self.routing(*stats.routing_shape))
        return self.caches
