"""The first-block guess (`EngineConfig.guess_first_block`): an optional heuristic for decode steps.

No earlier block pre-gates the decoder's first MoE block, so without a guess its experts are copied only
after its gate, in series with the computation. Decoder routing tends to repeat from token to token
(Huang et al. 2024), so the engine guesses the experts that block used at the previous step. Each step
starts copying the next step's guess right behind its stack's last prefetch (`starts_next_at`), so the
copy overlaps the stack's last blocks and the logits, and waits for it at the step's end
(`StepGuess.landed`): a table still in flight never leaves the step (see `landed`). With a staging key
(`EngineConfig.guess_staging`, native copies only) the copy lands in buffers the native library owns
instead, so it stays in flight across the step boundary and the next step's first block waits for it
(`StepGuess.take`). Once the block's gate has run, what the guess missed is copied (`StepGuess.at_gate`).
Outputs do not change; hits count as speculative hits, and guessed experts no token needed as
`speculative_wasted`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pregated_jax.engine import fetch as F
from pregated_jax.engine.sources import Guessed


def first(queue: F.CopyQueue, method: str, block, k: int, staging: int | None = None) -> F.PendingSlots:
    """The first decode step's guess: k empty slots (ids -1), as there is no earlier step to repeat. Staged
    (`staging`, a native staging key), it is handed over in flight, as every later step's is."""
    ids = jax.device_put(np.full((k,), -1, np.int32), queue.device)
    pending = queue.start_ids(method, block, ids, staging=staging)[0]
    return pending if staging is not None else F.PendingSlots(queue.finish(pending))


def starts_next_at(j: int, num_moe_blocks: int) -> bool:
    """Whether MoE block j (of the decoder's num_moe_blocks) starts the next step's guess: the one whose
    next block's prefetch is the stack's last copy."""
    return j == max(num_moe_blocks - 2, 0)


class StepGuess:
    """One decode step's guesses: the one the previous step started for this step (`incoming`) and the one
    this step starts for the next (`outgoing`, from the experts the block needed at this step).

    staging: the native staging key of a staged guess (None: the guess lands within its step)."""

    def __init__(self, incoming: F.PendingSlots, step, max_len: int, staging: int | None = None):
        self.incoming, self.step, self.max_len, self.staging = incoming, step, max_len, staging
        self.next_ids = None  # [k] the next step's guess, known once the block's gate has run
        self.outgoing: F.PendingSlots | None = None
        self._taken = None  # the incoming guess's table, once finished

    def at_gate(self, queue: F.CopyQueue, method: str, block, decision, k: int):
        """Starts copying what the incoming guess missed. -> (a `Guessed` source, experts copied)."""
        missed, copied = queue.start(method, block, decision, k, exclude=self.incoming.slots.expert_ids)
        self.next_ids = _repeat(decision, k, self.step, self.max_len)
        return Guessed(missed), copied

    def take(self, queue: F.CopyQueue, *after):
        """The incoming guess's table (waited for after `after` the first time it is asked for)."""
        if self._taken is None:
            self._taken = queue.finish(self.incoming, *after)
        return self._taken

    def start_next(self, queue: F.CopyQueue, method: str, block):
        """Starts copying the next step's guess. -> experts copied.

        Staged, it reuses the staging area the incoming guess was collected from, so it is ordered after
        that collection (`take`, done here if the block has not asked for its table yet)."""
        after = ()
        if self.staging is not None:
            taken = self.take(queue)
            after = tuple(jax.tree.leaves((taken.wi, taken.wo)))
        self.outgoing, copied = queue.start_ids(method, block, self.next_ids, staging=self.staging, after=after)
        return copied

    def landed(self, queue: F.CopyQueue, *after) -> F.PendingSlots | None:
        """The next step's guess as it crosses into the next step (after `after`, the step's last values), or
        None.

        The native copies of `fetch_start` write a table behind XLA's back, and XLA copies values that cross a
        loop iteration or a dispatch (a while loop's carry, a donated argument aliased to an output) where it
        likes: a copy of a table still in flight would read it before its transfers land. So an unstaged
        guess crosses the step boundary as a finished table. A staged one crosses in flight: only its ids and
        token do; its rows land in the native library's buffers.
        """
        if self.outgoing is None:
            return None
        if self.staging is not None:
            return self.outgoing
        return F.PendingSlots(queue.finish(self.outgoing, *after))


def discard(guess: F.PendingSlots):
    """A guess started for a step that never ran: waits for its copies. -> its counts, all wasted."""
    counts = _unused(guess.slots.expert_ids)
    F.finish_fetch(guess)
    return counts


@functools.partial(jax.jit, static_argnums=(1, 3))
def _repeat(decision, k: int, step, max_len: int):
    """The next step's guess: the experts `decision` needed [k], or none (-1) after the last step."""
    return jnp.where(step + 1 < max_len, F.needed_experts(decision, k), -1)


@jax.jit
def _unused(available):
    """A guess `available` [g] that no block read -> [3] int32: (0 found, 0 needed, its experts wasted)."""
    return jnp.stack([0, 0, jnp.sum(available >= 0)]).astype(jnp.int32)
