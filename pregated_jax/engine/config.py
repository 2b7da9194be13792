"""The engine's options: which mode, how experts are cached, copied and budgeted (`EngineConfig`)."""

from __future__ import annotations

import dataclasses

from pregated_jax.engine.cache import POLICIES
from pregated_jax.engine.fetch import COPY_METHODS
from pregated_jax.quant import DEFAULT_GROUP_SIZE, check_format, check_group_size

MODES = ("gpu-only", "on-demand", "prefetch-all", "pregated", "speculative")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How the engine places and moves experts.

    mode: where block N+1's experts come from while block N runs (see `pregated_jax.engine.schedule`):
      gpu-only (all resident), on-demand (copied after their gate), prefetch-all (the whole next block),
      pregated (the experts block N's pre-gate chose), speculative (the experts block N+1's own gate
      predicts from block N's input; misses copied after the gate).
    cache_policy: None (no cache: every call copies what it needs) or one of `cache.POLICIES`.
    cache_experts: device slots per MoE block for the cache (1 to the number of experts); or give
      `device_budget_bytes`, which bounds all expert buffers on the device together (cache slots, slot
      tables, streaming buffers). A budget below what the mode needs for one MoE block is refused with that
      minimum (`InferenceEngine.min_budget_bytes`); the non-expert weights are outside the budget.
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
    guess_staging: with guess_first_block and the native copies (copy_method "dma"): the guess's copy lands in
      buffers the native library owns (one more expert table per engine and batch size, outside XLA's
      memory), so it stays in flight across the step boundary and the next step's first MoE block waits for
      it; without it the copy must land within its step. Outputs do not change. Off by default: not yet timed
      on a GPU (docs/design.md).
    prefill_routed_only: calls that need most experts of a block (prefill) copy only the routed ones
      (default), or, if False, whole blocks as contiguous ranges (fewer, larger copies, more bytes).
      Budgeted calls without a cache always stream whole blocks in chunks.
    copy_method: how experts routed per call are copied (`fetch.COPY_METHODS`): "dma" (the native
      copy-engine custom calls; they overlap computation), "xla" (XLA's copy kernels, no native code), or
      "auto" (default): "dma" on a GPU where the native library builds, except for speculative mode's
      copies of mispredicted experts, which come after the real gate and overlap nothing, so XLA's kernels
      (no host round trip) are faster there; "xla" elsewhere. Cache fills, whole blocks and prefetch-all
      always use XLA's copies.
    expert_dtype: how expert weights are stored in host memory, copied and cached (`quant.FORMATS`):
      "bfloat16" (default: unquantized, in the model's dtype), "int8" or "float8_e4m3fn" (one scale per
      expert and output channel), "int4" (one scale per `expert_group_size` input rows, two values per
      byte). Dequantized on the device right before the grouped matmul; every mode, gpu-only included,
      computes with the same quantized weights. A quantized store (`scripts/quantize.py`) needs its own
      format here, and keeps the group size it was written with.
    expert_group_size: int4's input rows per scale; must divide d_model and d_ff.
    record_routing: count, per MoE block, the tokens every call routes to each expert and which experts fire
      together (`RunStats.routing_trace`: a trace for `scripts/plan_placement.py --trace`, and each device's
      load on a mesh). Every routed token counts, padding positions included: it is the engine's load. Off by
      default: it adds a few small kernels per MoE block.
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
    guess_staging: bool = False
    prefill_routed_only: bool = True
    copy_method: str = "auto"
    expert_dtype: str = "bfloat16"
    expert_group_size: int = DEFAULT_GROUP_SIZE
    record_routing: bool = False

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
        if self.cache_experts is not None and self.cache_experts < 1:
            raise ValueError(f"cache_experts must be >= 1 (device slots per MoE block) or None, got "
                             f"{self.cache_experts}")
        if self.device_budget_bytes is not None and self.device_budget_bytes < 0:
            raise ValueError(f"device_budget_bytes must be >= 0 (or None: unbounded), got {self.device_budget_bytes}")
        if self.guess_staging and not self.guess_first_block:
            raise ValueError("guess_staging stages the first-block guess's copies: it needs guess_first_block=True")
        if self.guess_staging and self.copy_method == "xla":
            raise ValueError("guess_staging needs the native copies (copy_method 'dma' or 'auto' on a GPU), "
                             "got copy_method='xla'")
        check_format(self.expert_dtype)
        check_group_size(self.expert_group_size)
        if self.cache_policy is not None and self.mode in ("gpu-only", "prefetch-all"):
            raise ValueError(f"mode {self.mode!r} keeps whole blocks resident; a cache does not apply")
