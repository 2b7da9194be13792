"""The offload inference engine: one block loop, one generation loop, five ways to get experts.

Modes (NOTES.md §1; Hwang et al. 2024):
- gpu-only:     every expert resident on the device (the ceiling).
- on-demand:    after block N's gate runs, copy its experts, then compute (MoE-OnDemand).
- prefetch-all: while block N runs, copy every expert of the next MoE block (MoE-Prefetch).
- pregated:     while block N runs, copy the experts that block N's pre-gate chose for block N+1.
- speculative:  for conventional models: block N+1's own gate applied to block N's MoE input predicts
                block N+1's experts, which are prefetched; mispredictions are fetched on demand once the
                real gate has run. Outputs equal the conventional model's.

Copies are issued (asynchronously dispatched) *before* the computation they should overlap with, and
routing decisions stay on the device until the copy itself reads them. `EngineConfig.copy_method` picks
how (see `fetch`): copy-engine transfers through the native custom calls ("dma", the default on a GPU),
which overlap computation, or XLA's own host-reading copy kernels ("xla"), which do not. Calls that need
most experts of a block (prefill) copy just the routed experts (`prefill_routed_only`), or whole blocks as
contiguous ranges, streamed through a bounded buffer when a budget is set.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from pregated_jax import native
from pregated_jax.engine import fetch as F
from pregated_jax.engine.placement import ModelProgram, Memories, StackProgram, cross_kv, predict_decision
from pregated_jax.engine.search import (all_finished, beam_step, best_sequences, greedy_step, init_search,
                                        reorder)
from pregated_jax.engine.stats import RunStats, Stopwatch
from pregated_jax.layers import key_padding, visibility_bias
from pregated_jax.model import KVCache, SwitchTransformer

MODES = ("gpu-only", "on-demand", "prefetch-all", "pregated", "speculative")


# the command lines' --guess_first_block choices -> EngineConfig.guess_first_block
GUESS_FIRST_BLOCK_CHOICES = {"auto": None, "on": True, "off": False}


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How the engine places and moves experts.

    cache_policy: None (no cache: every call copies what it needs) or one of `fetch.POLICIES`.
    cache_experts: device slots per MoE block for the cache; or give `device_budget_bytes`, which
      bounds all expert buffers together (cache slots, or the prefill streaming buffers).
    prefill_chunk: experts per copy when a call needs most of a block (default: all E at once, or what
      the budget allows).
    decode_steps_per_call: decode steps run by one dispatch (a loop inside the jitted step when > 1),
      which spreads the host's per-dispatch cost over several tokens. Tokens and statistics do not change.
      (H100, switch-base-128, batch 1: gpu-only decode 1.65 -> 0.75 ms/step going from 1 to 8; with the
      host waits of h100-v8's DMA copies, pregated 1.333 ms/step at 64 against 1.380 at 8.) The loop stops at
      EOS (`stop_when_finished`), so a dispatch of 64 steps costs nothing once every row has finished; the
      progress callback runs once per dispatch. With WHILE command buffers (`engine.xla_flags`) XLA runs the
      loop as one CUDA graph.
    stop_when_finished: end decoding once every row has emitted EOS: the loop inside a dispatch checks after
      every step (a `while_loop`; without WHILE command buffers the host reads its exit condition after
      every step), and the host stops dispatching (it reads a flag every `check_every` steps). False runs
      every step up to max_new_tokens (benchmarks: the same work on every run; rows that finished append
      padding).
    guess_first_block: in decode steps of modes pregated and speculative without a cache, the decoder's
      first MoE block, which no earlier block pre-gates, gets a guess: the experts it used at the previous
      step (decoder routing repeats from token to token; Huang et al. 2024). The previous step starts
      copying it right behind its own last prefetch, so the copies run on over the step boundary, the
      embedding and the blocks before the first MoE block; whatever the guess missed is fetched once the
      block's gate has run. Outputs do not change; hits count as speculative hits, and guessed experts no
      token needed (the guess of a step that never ran included) as `speculative_wasted`. None (default):
      on where a decode step routes one row (batch x beams = 1). There the done's kernel skips the wait
      when nothing was missed, and on an H100 (switch-base-128, docs/benchmarks/h100-v10, whose random model
      repeats one token) the guess hits 80% and takes pregated decode from 712.0 to 835.2 tokens/s. With
      more rows the guess copies more experts than the boundary hides (batch 8: 6.03 against 5.89 ms/step
      in h100-v8, when the guess still started in its own step).
    prefill_routed_only: calls that need most experts of a block (prefill) copy only the routed ones
      (default), or, if False, whole blocks as contiguous ranges (fewer, larger copies at the link's full
      bandwidth, but more bytes). Budgeted calls without a cache always stream whole blocks in chunks.
    copy_method: how experts routed per call are copied (`fetch.COPY_METHODS`): "dma" (the native
      copy-engine custom calls; they overlap computation), "xla" (XLA's copy kernels, no native code), or
      "auto" (default): on a GPU where the native library builds, "dma", except for speculative mode's
      fetches of mispredicted experts, which come after the real gate and overlap nothing: XLA's kernels
      skip the host round trip there (H100: 2.17 against 2.59 ms per step); "xla" elsewhere. Cache
      lookups, whole blocks and prefetch-all always use XLA's copies (gpu-only and prefetch-all copy no
      routed experts: they report "xla").
    """

    mode: str = "pregated"
    cache_policy: str | None = None
    cache_experts: int | None = None
    device_budget_bytes: int | None = None
    prefill_chunk: int | None = None
    check_every: int = 8  # decode steps between checks whether every sequence has finished
    decode_steps_per_call: int = 64
    stop_when_finished: bool = True
    guess_first_block: bool | None = None
    prefill_routed_only: bool = True
    copy_method: str = "auto"

    def __post_init__(self):
        if self.decode_steps_per_call < 1 or self.check_every < 1:
            raise ValueError(f"decode_steps_per_call and check_every must be >= 1, got "
                             f"{self.decode_steps_per_call} and {self.check_every}")
        if self.mode not in MODES:
            raise ValueError(f"unknown engine mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.cache_policy is not None and self.cache_policy not in F.POLICIES:
            raise ValueError(f"unknown cache policy {self.cache_policy!r}; choose one of {F.POLICIES}")
        if self.copy_method not in ("auto",) + F.COPY_METHODS:
            raise ValueError(f"unknown copy method {self.copy_method!r}; choose auto or one of {F.COPY_METHODS}")
        if self.cache_policy is not None and self.mode in ("gpu-only", "prefetch-all"):
            raise ValueError(f"mode {self.mode!r} keeps whole blocks resident; a cache does not apply")


@dataclasses.dataclass
class GenerationResult:
    tokens: np.ndarray  # [B, max_new_tokens] new tokens, pad after EOS
    stats: RunStats


class InferenceEngine:
    """Generates with expert weights in host memory and everything else on the device."""

    def __init__(self, model: SwitchTransformer, config: EngineConfig | None = None, *,
                 device: jax.Device | None = None, **overrides):
        config = dataclasses.replace(config or EngineConfig(), **overrides)
        cfg = model.config
        if config.mode == "pregated" and cfg.routing != "pregated":
            raise ValueError("mode 'pregated' needs a pre-gated model (config.routing='pregated'); "
                             "use mode 'speculative' for a conventional one, or convert it with to_pregated")
        if config.mode == "speculative" and cfg.routing != "conventional":
            raise ValueError("mode 'speculative' predicts with the next block's own gate: it needs a "
                             "conventional model; use mode 'pregated' for a pre-gated one")
        model.eval()  # inference is deterministic: no dropout, no router jitter
        self.config, self.model_config = config, cfg
        self.mem = Memories.for_device(device)
        if config.mode == "gpu-only":  # experts placed on the device, as the ceiling
            self.mem = dataclasses.replace(self.mem, on_host=self.mem.on_device)
        self.program = ModelProgram.from_model(model, self.mem)
        some = self.program.encoder.blocks[self.program.encoder.moe_blocks[0]] if self.program.encoder.moe_blocks \
            else self.program.decoder.blocks[self.program.decoder.moe_blocks[0]]
        self.num_experts, self.expert_bytes = some.num_experts, some.expert_bytes
        self.num_moe_blocks = len(self.program.encoder.moe_blocks) + len(self.program.decoder.moe_blocks)
        self.cache_slots = self._cache_slots()
        # method for routed fetches, and for speculative mode's fetches of mispredicted experts
        self.copy_method = self._copy_method()
        self.miss_copy_method = ("xla" if config.copy_method == "auto" and config.mode == "speculative"
                                 else self.copy_method)
        self.chunk = self._prefill_chunk()
        self.caches: dict = {}  # (stack, block) -> CacheState, kept across decode steps and requests
        if self.cache_slots is not None:
            for sp in (self.program.encoder, self.program.decoder):
                for i in sp.moe_blocks:
                    b = sp.blocks[i]
                    self.caches[(sp.kind, i)] = F.empty_cache(self.cache_slots, b.host_wi, b.host_wo,
                                                              self.mem.on_device)
        # The fused decode step takes the decoder's weights as one flat list of arrays, flattened once
        # here: flattening the nested program (hundreds of nnx Variables) on every call cost 0.7-1.1 ms per
        # step, as much as the step's GPU work at batch 1.
        decoder_program = dataclasses.replace(self.program, encoder=None)
        self._decoder_leaves, treedef = jax.tree.flatten(decoder_program)
        self._decode_step = jax.jit(functools.partial(self._flat_step, treedef), static_argnums=(7, 8),
                                    donate_argnums=(1, 2, 5, 9))

    # --- sizing -------------------------------------------------------------------------------------
    def _cache_slots(self) -> int | None:
        c = self.config
        if c.cache_policy is None:
            return None
        if c.cache_experts is not None:
            return c.cache_experts
        if c.device_budget_bytes is None:
            raise ValueError("a cache needs a size: cache_experts (per MoE block) or device_budget_bytes")
        slots = c.device_budget_bytes // (self.num_moe_blocks * self.expert_bytes)
        if slots < 1:
            raise ValueError(f"device_budget_bytes={c.device_budget_bytes} holds less than one expert per "
                             f"MoE block ({self.num_moe_blocks} blocks x {self.expert_bytes} bytes)")
        return int(min(slots, self.num_experts))

    def _copy_method(self) -> str:
        method = self.config.copy_method
        if self.config.mode in ("gpu-only", "prefetch-all"):
            return "xla"  # nothing routed is copied: experts resident, or whole blocks
        if method == "auto":
            if self.mem.device.platform != "gpu":
                return "xla"
            if not native.available():
                warnings.warn(f"copying experts with XLA's kernels, which do not overlap computation: "
                              f"{native.unavailable_reason()}", stacklevel=3)
                return "xla"
            method = "dma"
        elif method == "dma" and not native.available():
            raise ValueError(f"copy_method='dma' needs the native library: {native.unavailable_reason()}")
        if method == "dma" and self.mem.device.platform == "gpu":
            _warn_if_modules_load_lazily()
        return method

    def _prefill_chunk(self) -> int:
        c, e = self.config, self.num_experts
        if c.prefill_chunk is not None:
            return max(1, min(c.prefill_chunk, e))
        if c.device_budget_bytes is not None and self.cache_slots is None:
            # two chunks in flight (double buffering) for the current and the next block
            return int(max(1, min(e, c.device_budget_bytes // (4 * self.expert_bytes))))
        return e

    # --- one stack ----------------------------------------------------------------------------------
    def _run_stack(self, sp: StackProgram, x, bias, ctx: "RunContext", *, cross=None, cross_bias=None,
                   caches=None, cache_index=None):
        """Runs every block of a stack; returns (final-normed hidden, new self-attention caches)."""
        mode, cfg = self.config.mode, self.model_config
        tokens = x.shape[0] * x.shape[1]
        k = min(self.num_experts, tokens)
        dense = 2 * k >= self.num_experts  # the call needs most experts: copy contiguous ranges
        capacity = cfg.capacity(x.shape[1])
        moe = sp.moe_blocks
        prefetched: dict[int, object] = {}
        if ctx.guess is not None:  # a decode step's guess for the first MoE block, started by the previous step
            prefetched[moe[0]] = ("guess", ctx.guess)
        new_caches = []
        decision = None
        if mode == "prefetch-all" and moe:
            prefetched[moe[0]] = self._copy_all(sp, moe[0], ctx)
        for i, bp in enumerate(sp.blocks):
            cache = None if caches is None else caches[i]
            if not bp.is_sparse:
                x, h, _, _, cache = bp.attend_and_route(x, bias, None, None if cross is None else cross[i],
                                                        cross_bias, cache, cache_index)
                x = bp.ffn_output(x, h, None, None)
                new_caches.append(cache)
                continue
            j = moe.index(i)
            nxt = moe[j + 1] if j + 1 < len(moe) else None
            if ctx.profile_blocks:
                started = Stopwatch(wait=x)
            if mode == "prefetch-all" and nxt is not None:  # issued before this block's computation
                prefetched[nxt] = self._copy_all(sp, nxt, ctx)
            x, h, decision, next_decision, cache = bp.attend_and_route(
                x, bias, decision, None if cross is None else cross[i], cross_bias, cache, cache_index)
            new_caches.append(cache)
            # Issue the next block's copies before this block's expert computation, once the blocks
            # before this one are done (their expert buffers freed): at most two blocks in flight.
            _backpressure(x)
            first = None  # copies of this block's that the next block's must queue behind
            if nxt is not None and i not in prefetched and self._fetches_routed(mode, dense):
                # Nothing was prefetched for this block (the first MoE block of a stack): its own copies
                # go first, or they would queue behind the next block's on the copy stream. The next
                # start takes this one's token (XLA orders independent custom calls as it likes).
                prefetched[i] = self._fetch_own(sp, i, decision, k, dense, ctx)
                first = prefetched[i][1]
            elif isinstance(prefetched.get(i), tuple) and prefetched[i][0] == "guess":
                # The guess's copies are under way; what it missed is fetched now, before the next block's.
                guess = prefetched[i][1]
                missed, copied = self._start_fetch(sp.blocks[i], decision, k, guess.slots.expert_ids,
                                                   dense=dense, miss=True, after=guess)
                ctx.add_copied(copied)
                next_guess_ids = _repeat_guess(decision, k, *ctx.guess_horizon)
                prefetched[i] = ("guessed", guess, missed)
                first = missed
            if nxt is not None and mode == "pregated":
                pending = self._prefetch(sp, nxt, next_decision, k, dense, ctx, after=first)
            elif nxt is not None and mode == "speculative":
                guess = predict_decision(sp.blocks[nxt].router_classifier, h, capacity)
                pending = self._prefetch(sp, nxt, guess, k, dense, ctx, after=first)
            else:
                pending = None
            # This block's wait takes the next block's start token: that start is issued before this
            # block's experts, so its copies overlap them.
            in_flight = pending[1] if isinstance(pending, tuple) and pending[0] == "slots" else None
            issued = [in_flight]
            if ctx.guess is not None and j == max(len(moe) - 2, 0):
                # The stack's last copies are queued: the next step's guess goes right behind them, so the copy
                # engine keeps busy over the step boundary (the next step's first block waits for it).
                ctx.next_guess, copied = self._start_guess(next_guess_ids,
                                                           in_flight if in_flight is not None else first)
                ctx.add_copied(copied)
                issued.append(ctx.next_guess)
            after = (x,) + tuple(p.token for p in issued if p is not None and p.token is not None)
            x = self._experts(sp, i, x, h, decision, prefetched.pop(i, None), k, dense, ctx, after)
            if pending is not None:
                prefetched[nxt] = pending
            decision = next_decision
            if ctx.track_memory:
                ctx.sample_memory(self.mem.device)
            if ctx.profile_blocks:
                ctx.moe_block_s.append(started.lap(x))
        return sp.final_norm(x), (None if caches is None else new_caches)

    def _start_guess(self, ids, after=None):
        """Starts copying a guess `ids` [k] for the decoder's first MoE block (EngineConfig.guess_first_block),
        queued behind `after`'s copies -> (PendingSlots, experts copied)."""
        dec = self.program.decoder
        b = dec.blocks[dec.moe_blocks[0]]
        return F.start_fetch_ids(self.copy_method, b.host_wi, b.host_wo, b.host_stacks, ids, self.mem.on_device,
                                 after=after)

    def _copy_all(self, sp, i, ctx):
        b = sp.blocks[i]
        ctx.add_copied(self.num_experts)
        return F.fetch_all(b.host_wi, b.host_wo, self.mem.on_device)

    def _prefetch(self, sp, i, decision, k, dense, ctx, after=None):
        """Starts copying block i's experts for a predicted/pre-gated decision (returns the handle).

        after: a PendingSlots whose copies must go first (see `F.start_fetch`)."""
        b = sp.blocks[i]
        if dense and self.chunk < self.num_experts:
            return None  # bounded buffers: stream after the gate instead
        if dense and not self._dense_routed_only():
            return self._copy_all(sp, i, ctx)
        if self.cache_slots is not None:
            self._cache_lookup(ctx, sp, i, F.needed_experts_jit(decision, k))
            return ("cache", decision)
        pending, copied = self._start_fetch(b, decision, k, dense=dense, after=after)
        ctx.add_copied(copied)
        return ("slots", pending, decision)

    def _start_fetch(self, b, decision, k, exclude=None, *, dense, miss=False, after=None):
        method = self.miss_copy_method if miss and not dense else self.copy_method
        return F.start_fetch(method, b.host_wi, b.host_wo, b.host_stacks, decision, k, self.mem.on_device,
                             exclude, compact=dense, after=after)

    def _fetches_routed(self, mode, dense) -> bool:
        """Whether a block's experts are copied as a fresh table of routed experts (no cache, no ranges)."""
        return (mode in ("on-demand", "pregated", "speculative") and self.cache_slots is None
                and (not dense or self._dense_routed_only()))

    def _fetch_own(self, sp, i, decision, k, dense, ctx):
        """Starts copying block i's experts for its own gate's decision (waited for in `_experts`)."""
        pending, copied = self._start_fetch(sp.blocks[i], decision, k, dense=dense)
        ctx.add_copied(copied)
        return ("own", pending)

    def _dense_routed_only(self) -> bool:
        """Whether calls that need most experts of a block copy only the routed ones (into a fresh table
        of min(E, tokens) slots); otherwise whole blocks, through bounded chunks under a budget, and
        past the cache when there is one."""
        return (self.config.prefill_routed_only and self.chunk == self.num_experts
                and self.cache_slots is None)

    def _experts(self, sp, i, x, h, decision, prefetched, k, dense, ctx, after=()):
        """The MoE sublayer of block i with whatever expert source the mode provides.

        after: values that waiting for block i's prefetched copies must follow (see `F.finish_fetch`)."""
        b, mode = sp.blocks[i], self.config.mode
        if mode == "gpu-only":  # the "host" stacks are on the device in this mode
            return b.ffn_output(x, h, decision, F.ExpertSlots(b.host_wi, b.host_wo, None))
        if mode == "prefetch-all" or (dense and isinstance(prefetched, F.ExpertSlots)):
            return b.ffn_output(x, h, decision, prefetched)
        if dense and not self._dense_routed_only():
            return self._stream(b, x, h, decision, ctx)  # contiguous chunks after the gate
        needed = F.needed_experts_jit(decision, k)
        if self.cache_slots is not None:
            if mode == "speculative" and prefetched is not None:  # a guess's copies are cache fills
                ctx.add_speculation(F.overlap(needed, F.needed_experts_jit(prefetched[1], k)).at[2].set(0))
            if mode == "pregated" and prefetched is not None:  # the pre-gate's lookup already ran
                return b.ffn_output(x, h, decision, ctx.caches[(sp.kind, i)].slots)
            state = self._cache_lookup(ctx, sp, i, needed)  # hits for everything prefetched
            return b.ffn_output(x, h, decision, state.slots)
        if prefetched is None:  # on-demand, or the first MoE block of a stack
            prefetched = self._fetch_own(sp, i, decision, k, dense, ctx)
        if prefetched[0] == "own":
            return b.ffn_output(x, h, decision, F.finish_fetch(prefetched[1], *after))
        if prefetched[0] == "guessed":
            _, guess, missed = prefetched
            guessed = F.finish_fetch(guess, *after)
            ctx.add_speculation(F.overlap(needed, guessed.expert_ids))
            return b.ffn_output(x, h, decision, F.merge_slots(guessed, F.finish_fetch(missed, *after)))
        _, pending, guess = prefetched
        slots = F.finish_fetch(pending, *after)
        if mode == "speculative":  # fetch what the guess missed
            ctx.add_speculation(F.overlap(needed, slots.expert_ids))
            extra, copied = self._start_fetch(b, decision, k, slots.expert_ids, dense=dense, miss=True)
            ctx.add_copied(copied)
            slots = F.merge_slots(slots, F.finish_fetch(extra))
        return b.ffn_output(x, h, decision, slots)

    def _stream(self, b, x, h, decision, ctx):
        """Dense call under a bounded buffer: contiguous chunks, the next copy issued before compute."""
        starts = list(range(0, self.num_experts, self.chunk))
        size = lambda s: min(self.chunk, self.num_experts - s)  # noqa: E731
        current = F.fetch_range(b.host_wi, b.host_wo, starts[0], size(starts[0]), self.mem.on_device)
        for n, s in enumerate(starts):
            ctx.add_copied(size(s))
            _backpressure(x)  # chunk n-1 consumed: its buffer is free before chunk n+1 is allocated
            upcoming = (F.fetch_range(b.host_wi, b.host_wo, starts[n + 1], size(starts[n + 1]),
                                      self.mem.on_device) if n + 1 < len(starts) else None)
            x = b.ffn_output(x, h, decision, current)  # residual chaining sums the chunks' outputs
            current = upcoming
        return x

    def _cache_lookup(self, ctx, sp, i, needed):
        key, b = (sp.kind, i), sp.blocks[i]
        ctx.caches[key] = F.cache_lookup(ctx.caches[key], b.host_wi, b.host_wo, needed,
                                         self.config.cache_policy, self.mem.on_device)
        return ctx.caches[key]

    # --- generation ---------------------------------------------------------------------------------
    def _flat_step(self, treedef, leaves, search, kv, cross, cross_bias, caches, key_positions, num_beams,
                   num_steps, guess):
        """`num_steps` decode steps (`_step`), the decoder program given as flat leaves (see __init__).

        -> (search, kv, caches, experts copied, [speculative hits, needed, wasted], guess), counts summed
        over the steps.
        """
        program = jax.tree.unflatten(treedef, leaves)
        step = functools.partial(self._step, program, cross=cross, cross_bias=cross_bias,
                                 key_positions=key_positions, num_beams=num_beams)
        if self.config.decode_steps_per_call == 1:  # the host checks for EOS (see `generate`)
            return step(search=search, kv=kv, caches=caches, guess=guess)

        def body(carry):
            n, search, kv, caches, copied, speculation, guess = carry
            search, kv, caches, c, s, guess = step(search=search, kv=kv, caches=caches, guess=guess)
            return n + 1, search, kv, caches, copied + c, speculation + s, guess

        def more(carry):  # with stop_when_finished, a data-dependent exit: a device->host read per step
            n, search = carry[:2]
            if self.config.stop_when_finished:
                return (n < num_steps) & ~jnp.all(search.finished)
            return n < num_steps

        carry = (jnp.int32(0), search, kv, caches, jnp.int32(0), jnp.zeros((3,), jnp.int32), guess)
        return jax.lax.while_loop(more, body, carry)[1:]

    def _step(self, program, search, kv, cross, cross_bias, caches, key_positions, num_beams, guess):
        """One decode step for every row, traced into a single jitted function (`_decode`).

        -> (search, kv, caches, copied, speculation, the next step's guess)."""
        ctx = RunContext(caches, guess=guess)
        search, kv = self._decode(program, search, kv, cross, cross_bias, ctx, key_positions, num_beams)
        copied, speculation = ctx.totals()
        return search, kv, ctx.caches, copied, speculation, ctx.next_guess

    def _decode(self, program, search, kv, cross, cross_bias, ctx, key_positions, num_beams):
        """One decode step, traced (`_step`) or dispatched block by block (the reference). -> (search, kv).

        With copy_method "dma" each prefetch's start is ordered before the block's expert computation
        (the block's wait takes its token) and its wait just before the next block's use; XLA's own
        copies ("xla") are scheduled by XLA and run in series with the compute kernels
        (docs/benchmarks/h100-copy-overlap).
        """
        cfg, dec = self.model_config, program.decoder
        ctx.guess_horizon = (search.step, search.tokens.shape[-1])  # whether a next step needs a guess
        bias = dec.self_bias(search.step[None], key_positions, None)
        x = program.embed(search.last[:, None])  # [rows, 1, d]
        x, kv = self._run_stack(dec, x, bias, ctx, cross=cross, cross_bias=cross_bias, caches=kv,
                                cache_index=search.step)
        logits = program.logits(x)[:, -1]  # [rows, V]
        if num_beams == 1:
            return greedy_step(search, logits, cfg.pad_token_id, cfg.eos_token_id), kv
        search, origin = beam_step(search, logits, cfg.pad_token_id, cfg.eos_token_id)
        return search, reorder(kv, origin)

    def generate(self, input_ids, attention_mask=None, *, max_new_tokens: int = 32, num_beams: int = 1,
                 length_penalty: float = 1.0, progress=None, track_memory: bool = False,
                 profile_blocks: bool = False, fused: bool = True) -> GenerationResult:
        """Greedy (num_beams=1) or beam search. input_ids [B, S] -> GenerationResult(tokens [B, T]).

        Each decode step (or `decode_steps_per_call` steps) is one jitted call (`fused`); `fused=False`
        dispatches every block separately (the reference path, and what `profile_blocks` uses).
        progress(step, total) is called after every dispatch. For measurements only: `track_memory` samples
        device bytes-in-use after every dispatch; `profile_blocks` synchronizes around every MoE block to time
        it (removing the overlap it measures).
        """
        cfg, put = self.model_config, lambda a: jax.device_put(np.asarray(a, np.int32), self.mem.on_device)
        input_ids = np.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
        mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {input_ids.shape}")
        if max_new_tokens <= 0 or num_beams <= 0:
            raise ValueError(f"max_new_tokens and num_beams must be positive, got {max_new_tokens}, {num_beams}")
        batch, rows = input_ids.shape[0], input_ids.shape[0] * num_beams
        if self.cache_slots is not None and self.cache_slots < min(rows, self.num_experts):
            raise ValueError(f"cache_experts={self.cache_slots} per block is less than the {rows} tokens a "
                             f"decode step may route (batch x beams); raise it or the budget")
        fused = fused and not profile_blocks
        stats = RunStats.start(self, batch, num_beams, input_ids.shape[1], max_new_tokens)
        watch = Stopwatch()
        ids, mask = put(input_ids), put(mask)
        program = self.program

        # Prefill: the encoder over the whole input, block by block, then cross-attention keys/values.
        ctx = RunContext(self.caches, stats, track_memory, profile_blocks)
        enc = program.encoder
        positions = jax.device_put(np.arange(input_ids.shape[1], dtype=np.int32), self.mem.on_device)
        hidden, _ = self._run_stack(enc, program.embed(ids), enc.self_bias(positions, positions, mask), ctx)
        if num_beams > 1:
            hidden, mask = reorder((hidden, mask), put(np.repeat(np.arange(batch), num_beams)))
        dec = program.decoder
        cross = [cross_kv(b.graphdef, b.state, b.placeholder, hidden) for b in dec.blocks]
        cross_bias = _padding_bias(mask)
        kv = _init_caches(rows, cfg, max_new_tokens, self.mem.on_device)
        key_positions = jax.device_put(np.arange(max_new_tokens, dtype=np.int32), self.mem.on_device)
        search = init_search(batch, num_beams, max_new_tokens, cfg.decoder_start_token_id)
        self.caches = ctx.flush_into(stats)
        stats.mark_prefill_done(self)
        # A fused first decode dispatch is queued before the host waits for the prefill, so the device goes
        # from the prefill's last kernel straight into the decode loop instead of idling while the host
        # dispatches (1.5-2 ms for switch-base-128 on an H100: docs/benchmarks/h100-v11). The prefill's
        # latency is read right after that dispatch; it includes the dispatch only where the prefill finished
        # first. Block-by-block decoding synchronizes as it goes, so there the prefill is timed first.
        if not fused:
            stats.prefill_s = watch.lap(hidden)

        guess = self._first_guess(rows)
        t, finished = 0, None  # finished: the last check's all-finished flag, read one dispatch later
        while t < max_new_tokens:
            n = min(self.config.decode_steps_per_call, max_new_tokens - t) if fused else 1
            if fused:
                search, kv, self.caches, copied, speculation, guess = self._decode_step(
                    self._decoder_leaves, search, kv, cross, cross_bias, self.caches, key_positions, num_beams, n,
                    guess)
                stats.add_copied(copied)
                stats.add_speculation(speculation)
                if track_memory:
                    stats.sample_memory(self.mem.device)
                if t == 0:
                    stats.prefill_s = watch.lap(hidden)
            else:
                ctx = RunContext(self.caches, stats, track_memory, profile_blocks, guess=guess)
                search, kv = self._decode(program, search, kv, cross, cross_bias, ctx, key_positions, num_beams)
                self.caches, guess = ctx.flush_into(stats), ctx.next_guess
            done_before, t = t, t + n
            if progress is not None:
                progress(t, max_new_tokens)
            # Reading a check's flag waits for the dispatch that computed it, so it is read only after the
            # next dispatch is queued: the device never idles while the host checks and dispatches. A fused
            # dispatch queued after every row has finished runs no step; one-step dispatches append padding.
            if finished is not None and bool(jax.device_get(finished)):
                break
            crossed_check = t // self.config.check_every > done_before // self.config.check_every
            finished = all_finished(search) if crossed_check and self.config.stop_when_finished else None
        if self.copy_method == "dma":
            # The decode finishes before the host launches what follows (compiled anew for each shape): a
            # kernel's first launch may wait for a spinning done (engine.xla_flags, eager module loading).
            jax.block_until_ready(search)
        if guess is not None:  # started for a step that did not run: wait for its copies, count them wasted
            stats.add_speculation(F.unused(guess.slots.expert_ids))
            F.finish_fetch(guess)
        # one transfer; steps run, not dispatched: a fused dispatch may stop early
        tokens, steps = jax.device_get((best_sequences(search, length_penalty), search.step))
        tokens, stats.steps = np.asarray(tokens), int(steps)
        stats.decode_s = watch.lap()
        if self.copy_method == "dma":
            native.check_device_wait()  # a copy wait that timed out leaves wrong results: raise
        stats.finish(self)
        return GenerationResult(tokens, stats)

    def _first_guess(self, rows: int):
        """The first decode step's guess for the decoder's first MoE block, started: a PendingSlots of k
        empty slots (ids -1: nothing to copy, no earlier step to repeat), or None where the engine does not
        guess (EngineConfig.guess_first_block)."""
        k = min(self.num_experts, rows)
        dense = 2 * k >= self.num_experts
        wanted = self.config.guess_first_block
        if wanted is None:
            wanted = rows == 1
        if (not wanted or self.config.mode not in ("pregated", "speculative") or dense
                or not self.program.decoder.moe_blocks or not self._fetches_routed(self.config.mode, dense)):
            return None
        return self._start_guess(jax.device_put(np.full((k,), -1, np.int32), self.mem.on_device))[0]


class RunContext:
    """Bookkeeping of one pass through the blocks: copies, speculation hits, cache states.

    In an eager pass it holds device arrays and hands them to the run's statistics; inside the traced
    decode step it holds tracers, which `totals()` turns into the step's outputs.
    """

    def __init__(self, caches: dict, stats: RunStats | None = None, track_memory: bool = False,
                 profile_blocks: bool = False, guess=None):
        self.caches = dict(caches)
        # a decode step's guess for the first MoE block (started by the previous step), the next step's
        # (started by this one), and (step, max_len), which says whether there is a next step
        self.guess, self.next_guess, self.guess_horizon = guess, None, None
        self.copied, self.speculation = [], []
        self.stats, self.track_memory, self.profile_blocks = stats, track_memory, profile_blocks
        self.moe_block_s = stats.moe_block_s if stats is not None else []

    def add_copied(self, n):
        self.copied.append(n)

    def add_speculation(self, pair):
        self.speculation.append(pair)

    def sample_memory(self, device):
        self.stats.sample_memory(device)

    def totals(self):
        """(experts copied, [speculative hits, needed, wasted]) as traced int32 values."""
        copied = sum(jnp.asarray(n, jnp.int32) for n in self.copied) if self.copied else jnp.int32(0)
        spec = sum(self.speculation) if self.speculation else jnp.zeros((3,), jnp.int32)
        return copied, spec

    def flush_into(self, stats: RunStats) -> dict:
        for n in self.copied:
            stats.add_copied(n)
        for pair in self.speculation:
            stats.add_speculation(pair)
        return self.caches


@functools.partial(jax.jit, static_argnums=(1, 3))
def _repeat_guess(decision, k: int, step, max_len: int):
    """The next decode step's guess for a first MoE block: the experts `decision` needed [k], or none (-1)
    where step `step` is the last of `max_len`."""
    return jnp.where(step + 1 < max_len, F.needed_experts(decision, k), -1)


def _warn_if_modules_load_lazily():
    """The native copies' done kernel spins until the copy worker enqueues its copies; a kernel's first
    launch under lazy module loading may wait for it (engine.xla_flags explains). Scripts set EAGER."""
    if os.environ.get("CUDA_MODULE_LOADING", "").upper() != "EAGER":
        warnings.warn("CUDA_MODULE_LOADING is not EAGER: with the native expert copies, a kernel's first launch "
                      "under lazy loading can stall the copies until they time out. Set CUDA_MODULE_LOADING=EAGER "
                      "before JAX starts (pregated_jax.engine.xla_flags.use_eager_module_loading).", stacklevel=4)


def _backpressure(x):
    """Waits for x outside a trace (async dispatch would otherwise allocate every copy up front);
    inside the fused decode step XLA schedules copies and frees buffers itself."""
    if not isinstance(x, jax.core.Tracer):
        jax.block_until_ready(x)


@jax.jit
def _padding_bias(mask):
    return visibility_bias(key_padding(mask))


def _init_caches(rows, cfg, max_len, device):
    """Zeroed self-attention caches, one distinct buffer per layer (the decode step donates them)."""
    kv = _zero_caches(rows, cfg.num_heads, max_len, cfg.d_kv, cfg.dtype, cfg.num_decoder_layers)
    return jax.device_put(kv, device)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _zero_caches(rows, heads, max_len, d_kv, dtype, layers):
    shape = (rows, heads, max_len, d_kv)
    return [KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(layers)]
