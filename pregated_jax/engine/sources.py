"""Where an MoE block's experts come from: one small type per source.

The engine decides a block's source ahead of the block (the mode's `schedule`) or once its gate has run,
and `InferenceEngine._apply_experts` dispatches on the type:

- `Resident`: every expert is on the device (gpu-only).
- `WholeBlock`: every expert of the block was copied ahead (prefetch-all; calls that copy whole blocks).
- `Streamed`: every expert, copied after the gate in chunks through a bounded buffer.
- `Prefetched`: the experts block N's pre-gate chose for this block, copied while block N ran. They are
  exactly the experts this block routes to (pregated mode).
- `Predicted`: the experts a prediction chose (speculative mode: this block's own gate applied to the
  previous block's input), copied ahead; what it missed is copied after the gate.
- `Guessed`: the first-block guess (`guess`), with what it missed already being copied.
- `AfterGate`: the experts this block's own gate chose, copied after the gate (on-demand, and a stack's
  first MoE block).
- `Cached`: the device cache was filled ahead for a pre-gated (`exact`) or predicted decision.
"""

from __future__ import annotations

import dataclasses

from pregated_jax.engine.fetch import PendingSlots
from pregated_jax.moe import ExpertSlots
from pregated_jax.routing import RouterDecision


@dataclasses.dataclass(frozen=True)
class Resident:
    pass


@dataclasses.dataclass(frozen=True)
class WholeBlock:
    slots: ExpertSlots  # every expert [E, ...]


@dataclasses.dataclass(frozen=True)
class Streamed:
    pass


@dataclasses.dataclass(frozen=True)
class Prefetched:
    pending: PendingSlots


@dataclasses.dataclass(frozen=True)
class Predicted:
    pending: PendingSlots


@dataclasses.dataclass(frozen=True)
class Guessed:
    missed: PendingSlots  # the guess itself is the run's (`guess.StepGuess.take`)


@dataclasses.dataclass(frozen=True)
class AfterGate:
    pending: PendingSlots


@dataclasses.dataclass(frozen=True)
class Cached:
    decision: RouterDecision  # the decision the cache was filled for
    exact: bool  # a pre-gate's decision (it is this block's routing), not a prediction


Source = Resident | WholeBlock | Streamed | Prefetched | Predicted | Guessed | AfterGate | Cached
