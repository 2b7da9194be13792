"""The engine's options: which mode, how experts are cached, copied and budgeted (`EngineConfig`)."""

from __future__ import annotations

import dataclasses

from pregated_jax.engine.cache import POLICIES
from pregated_jax.engine.fetch import COPY_METHODS

MODES = ("gpu-only", "on-demand", "prefetch-all", "pregated", "speculative")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How the engine places and moves experts.

    mode: where block N+1's experts come from while block N runs (see `pregated_jax.engine.schedule`):
      gpu-only (all resident), on-demand (copied after their gate), prefetch-all (the whole next block),
      pregated (the experts block N's pre-gate chose), speculative (the experts block N+1's own gate
      predicts from block N's input; misses copied after the gate).
    cache_policy: None (no cache: every call copies what it needs) or one of `cache.POLICIES`.
    cache_experts: device slots per MoE block for the cache; or give `device_budget_bytes`, which
      bounds all expert buffers together (cache slots, or the prefill streaming buffers).
    prefill_chunk: experts per copy when a call needs most of a block (default: all E at once, or what
      the budget allows).
    check_every: decode steps between the host's checks whether every row has finished.
    decode_steps_per_call: decode steps run by one dispatch (a loop inside the jitted step when > 1),
      which spreads the host's per-dispatch cost over many tokens. Tokens and statistics do not change.
      The loop stops at EOS (`stop_when_finished`), so a long dispatch costs nothing once every row has
      finished; the progress callback runs once per dispatch.
    stop_when_finished: end decoding once every row has emitted EOS: the loop inside a dispatch checks after
      every step, and the host stops dispatching (it reads a flag every `check_every` steps). False runs
      every step up to max_new_tokens (benchmarks: the same work on every run; finished rows append padding).
    guess_first_block: in decode steps of modes pregated and speculative without a cache, guess the experts
      of the decoder's first MoE block, which no earlier block pre-gates: the ones it used at the previous
      step (`pregated_jax.engine.guess`). Outputs do not change. Off by default: the guess's copy must land
      within the step that starts it, and there it costs more than it saves (docs/design.md).
    prefill_routed_only: calls that need most experts of a block (prefill) copy only the routed ones
      (default), or, if False, whole blocks as contiguous ranges (fewer, larger copies, more bytes).
      Budgeted calls without a cache always stream whole blocks in chunks.
    copy_method: how experts routed per call are copied (`fetch.COPY_METHODS`): "dma" (the native
      copy-engine custom calls; they overlap computation), "xla" (XLA's copy kernels, no native code), or
      "auto" (default): "dma" on a GPU where the native library builds, except for speculative mode's
      copies of mispredicted experts, which come after the real gate and overlap nothing, so XLA's kernels
      (no host round trip) are faster there; "xla" elsewhere. Cache fills, whole blocks and prefetch-all
      always use XLA's copies.
    """

    mode: str = "pregated"
    cache_policy: str | None = None
    cache_experts: int | None = None
    device_budget_bytes: int | None = None
    prefill_chunk: int | None = None
    check_every: int = 8
    decode_steps_per_call: int = 64
    stop_when_finished: bool = True
    guess_first_block: bool = False
    prefill_routed_only: bool = True
    copy_method: str = "auto"

    def __post_init__(self):
        if self.decode_steps_per_call < 1 or self.check_every < 1:
            raise ValueError(f"decode_steps_per_call and check_every must be >= 1, got "
                             f"{self.decode_steps_per_call} and {self.check_every}")
        if self.mode not in MODES:
            raise ValueError(f"unknown engine mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.cache_policy is not None and self.cache_policy not in POLICIES:
            raise ValueError(f"unknown cache policy {self.cache_policy!r}; choose one of {POLICIES}")
        if self.copy_method not in ("auto",) + COPY_METHODS:
            raise ValueError(f"unknown copy method {self.copy_method!r}; choose auto or one of {COPY_METHODS}")
        if self.cache_policy is not None and self.mode in ("gpu-only", "prefetch-all"):
            raise ValueError(f"mode {self.mode!r} keeps whole blocks resident; a cache does not apply")
