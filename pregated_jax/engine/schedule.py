"""Per mode, what is copied ahead of an MoE block: the one place where the modes differ.

A stack pass (`engine.StackPass`) asks its schedule, at fixed points of every MoE block N, for the source
of block N+1's experts (`sources`):

- `first`: at the start of the stack, for its first MoE block;
- `before_attention`: before block N's attention;
- `after_gate`: once block N's gate (and, in a pre-gated model, its pre-gate) has run, before block N's
  experts compute, so the copies overlap that computation.

A block with no source by the time its own gate has run gets `at_gate`'s: copied now (on-demand), from
the cache, streamed, or resident (gpu-only). Pre-gating is `Pregated.after_gate`: block N's pre-gate
decision `next_decision` is block N+1's routing, and its experts are copied while block N computes.
"""

from __future__ import annotations

from pregated_jax.engine import sources as S
from pregated_jax.engine.placement import predict_decision


class Schedule:
    """Nothing ahead of time: every block's experts come after its gate (`at_gate`)."""

    def first(self, run, sp):
        return None

    def before_attention(self, run, sp, nxt):
        return None

    def after_gate(self, run, sp, nxt, h, next_decision):
        return None

    def at_gate(self, run, sp, i, decision):
        return run.source_after_gate(sp, i, decision)


class GpuOnly(Schedule):
    """Every expert stays on the device."""

    def at_gate(self, run, sp, i, decision):
        return S.Resident()


class OnDemand(Schedule):
    """Block N's experts are copied after block N's gate: copies and computation in series."""


class PrefetchAll(Schedule):
    """Block N+1's experts, all of them, are copied before block N's attention."""

    def first(self, run, sp):
        return run.copy_whole(sp, sp.moe_blocks[0])

    def before_attention(self, run, sp, nxt):
        return run.copy_whole(sp, nxt)


class Pregated(Schedule):
    """Block N's pre-gate chose block N+1's experts: they are copied while block N computes."""

    def after_gate(self, run, sp, nxt, h, next_decision):
        return run.prefetch(sp, nxt, next_decision, exact=True)


class Speculative(Schedule):
    """Block N+1's own gate, applied to block N's MoE input, predicts block N+1's experts, which are copied
    while block N computes; what it missed is copied after block N+1's gate."""

    def after_gate(self, run, sp, nxt, h, next_decision):
        predicted = predict_decision(sp.blocks[nxt].router_classifier, h, run.capacity)
        return run.prefetch(sp, nxt, predicted, exact=False)


SCHEDULES = {"gpu-only": GpuOnly, "on-demand": OnDemand, "prefetch-all": PrefetchAll, "pregated": Pregated,
             "speculative": Speculative}


def for_mode(mode: str) -> Schedule:
    return SCHEDULES[mode]()
