"""The offload inference engine: expert weights in host memory, everything else on the device.

`InferenceEngine` splits a model once (`placement`), then generates: a prefill (the encoder, block by
block) and decode steps, `decode_steps_per_call` of them fused into one jitted dispatch. Every stack
pass runs `stack_pass.StackPass`, which takes each MoE block's experts from a source (`sources`) that the
mode's schedule (`schedule`) starts copying ahead of the block; `fetch` moves the bytes, `cache` keeps
experts on the device across steps, and `guess` covers the decoder's first MoE block.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from pregated_jax import native
from pregated_jax.engine import cache as C
from pregated_jax.engine import fetch as F
from pregated_jax.engine import guess as G
from pregated_jax.engine import on_mesh
from pregated_jax.engine import schedule
from pregated_jax.engine.config import MODES, EngineConfig
from pregated_jax.engine.context import RunContext
from pregated_jax.engine.mesh_layout import MeshLayout, pad_rows
from pregated_jax.engine.placement import ModelProgram, Memories, cross_kv
from pregated_jax.engine.search import all_finished, beam_step, best_sequences, greedy_step, init_search, reorder
from pregated_jax.engine.stack_pass import StackPass
from pregated_jax.engine.stats import RunStats, Stopwatch
from pregated_jax.layers import key_padding, visibility_bias
from pregated_jax.memory import GIB, check_request_fits
from pregated_jax.model import KVCache, SwitchTransformer, check_generation_input, check_token_ids

__all__ = ["MODES", "EngineConfig", "GenerationResult", "InferenceEngine"]

# Expert slot tables one call holds on the device at once, per routed mode: the block's and the next block's
# (pregated: the prefetch; on-demand: the previous block's until it is freed); speculative: the prediction, the
# misses, their merge (two tables' worth) and the next block's prediction. The first-block guess adds one.
ROUTED_TABLES = {"on-demand": 2, "pregated": 2, "speculative": 5}
# Chunks a streamed block holds in flight: two (double buffering) for the block computing and two for the next.
STREAM_BUFFERS = 4


def _one_call_at_a_time(method):
    """Runs `method` under the engine's lock: a call donates the cache states (`caches`) to its decode steps
    and replaces them with the results, so concurrent calls would pass each other's deleted buffers."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


@dataclasses.dataclass
class GenerationResult:
    tokens: np.ndarray  # [B, max_new_tokens] new tokens, pad after EOS
    stats: RunStats


class InferenceEngine:
    """Generates with expert weights in host memory and everything else on the device."""

    def __init__(self, model: SwitchTransformer, config: EngineConfig | None = None, *,
                 device: jax.Device | None = None, mesh: jax.sharding.Mesh | None = None, **overrides):
        """device: the one device to run on (default: the first); or `mesh` (`pregated_jax.make_mesh`), whose
        devices each hold a share of the experts (split over `expert`) and of the rows (over `data`), as
        `pregated_jax.engine.mesh_layout` describes. A one-device mesh runs as that device."""
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
        if mesh is not None and device is not None:
            raise ValueError("give the engine a device or a mesh, not both")
        if mesh is not None and mesh.size == 1:
            device, mesh = mesh.devices.flat[0], None
        # on a mesh: how weights, rows and routing are split over its devices (None on one device)
        self.layout = None if mesh is None else MeshLayout(mesh, cfg.num_experts)
        resident = config.mode == "gpu-only"  # experts placed on the device, as the ceiling
        if self.layout is None:
            self.mem = Memories.for_device(device)
            if resident:
                self.mem = dataclasses.replace(self.mem, on_host=self.mem.on_device)
            placed = self.mem
        else:
            on_mesh.check_config(config)
            placed, self.mem = self.layout.placement(resident), self.layout.traced(resident)
        # on a mesh the stacks keep a load-balanced placement's order: it decides which device holds which expert
        self.program = ModelProgram.from_model(model, placed, config.expert_dtype, config.expert_group_size,
                                               physical=self.layout is not None)
        some = self.program.encoder.blocks[self.program.encoder.moe_blocks[0]] if self.program.encoder.moe_blocks \
            else self.program.decoder.blocks[self.program.decoder.moe_blocks[0]]
        # experts of an MoE block that one device holds, copies and caches (on a mesh: its share)
        self.num_experts = some.num_experts if self.layout is None else self.layout.local_experts
        self.expert_bytes = some.expert_bytes
        self.expert_format = some.expert_format
        self.num_moe_blocks = len(self.program.encoder.moe_blocks) + len(self.program.decoder.moe_blocks)
        # (stack, block) -> the MoE block's number, encoder blocks first (the routing statistics' order)
        self.moe_number = {(sp.kind, i): n for n, (sp, i) in enumerate(
            (sp, i) for sp in (self.program.encoder, self.program.decoder) for i in sp.moe_blocks)}
        if config.cache_experts is not None and config.cache_experts > self.num_experts:
            raise ValueError(f"cache_experts={config.cache_experts} is more than the {self.num_experts} experts of "
                             f"an MoE block: allowed 1 to {self.num_experts} slots per block")
        # slot tables of one call on the device at once (`tables_exceed_budget`), the least budget the mode needs
        guesses = config.guess_first_block and config.mode in ("pregated", "speculative")
        # a staged guess also holds its rows in the native library's staging buffers
        self.tables = ROUTED_TABLES.get(config.mode, 0) + (1 + config.guess_staging if guesses else 0)
        self.min_budget_bytes = self._min_budget_bytes()
        self._check_budget()
        self.cache_slots = self._cache_slots()
        # method for routed fetches, and for speculative mode's fetches of mispredicted experts
        self.copy_method = self._copy_method()
        self.miss_copy_method = ("xla" if config.copy_method == "auto" and config.mode == "speculative"
                                 else self.copy_method)
        staged = guesses and config.guess_staging  # (modes that never guess ignore both settings)
        if staged and self.copy_method != "dma":
            raise ValueError(f"guess_staging needs the native copies, but copy_method={config.copy_method!r} "
                             f"resolved to {self.copy_method!r} here (no GPU, or the native library is unavailable)")
        # the staged guess's staging area: one per engine (its generations run one at a time)
        self.guess_staging_key = native.new_staging_key() if staged else None
        self.chunk = self._prefill_chunk()
        self._check_chunk_budget()
        # whether calls that need most experts of a block (prefill) copy only the routed ones, into a fresh
        # table of min(E, tokens) slots; otherwise whole blocks (streamed in chunks under a budget), and
        # past the cache when there is one
        self.dense_routed_only = (config.prefill_routed_only and self.chunk == self.num_experts
                                  and self.cache_slots is None)
        self.schedule = schedule.for_mode(config.mode)
        self.caches: dict = {}  # (stack, block) -> CacheState, kept across decode steps and requests
        self._lock = threading.Lock()  # one `generate` at a time: it donates and replaces `caches`
        if self.cache_slots is not None:
            for sp in (self.program.encoder, self.program.decoder):
                for i in sp.moe_blocks:
                    b = sp.blocks[i]
                    self.caches[(sp.kind, i)] = (
                        C.empty_cache(self.cache_slots, b.host_wi, b.host_wo, self.mem.on_device)
                        if self.layout is None else on_mesh.empty_caches(self, b))
        # The fused decode step takes the decoder's weights as one flat list of arrays, flattened once
        # here: flattening the nested program (hundreds of nnx Variables) on every call costs about as much
        # host time as a small model's decode step takes on the GPU.
        decoder_program = dataclasses.replace(self.program, encoder=None)
        self._decoder_leaves, treedef = jax.tree.flatten(decoder_program)
        step = self._flat_step if self.layout is None else on_mesh.decode_step(self)
        self._decode_step = jax.jit(functools.partial(step, treedef), static_argnums=(7, 8),
                                    donate_argnums=(1, 2, 5, 9))
        self._prefill_on_mesh = None if self.layout is None else on_mesh.Prefill(self)

    # --- sizing -------------------------------------------------------------------------------------
    def _cache_slots(self) -> int | None:
        c = self.config
        if c.cache_policy is None:
            return None
        if c.cache_experts is not None:
            return c.cache_experts
        if c.device_budget_bytes is None:
            raise ValueError("a cache needs a size: cache_experts (per MoE block) or device_budget_bytes")
        # the cache gets what the budget leaves beside the smallest streaming buffers (`_check_budget`: >= 1)
        eb = self.expert_bytes
        slots = (c.device_budget_bytes - STREAM_BUFFERS * eb) // (self.num_moe_blocks * eb)
        return int(min(slots, self.num_experts))

    def _min_budget_bytes(self) -> int:
        """The fewest bytes of expert buffers the mode needs on the device (the least `device_budget_bytes`
        that works): gpu-only holds every expert of every MoE block; prefetch-all two whole blocks (the one
        computing and the next); the routed modes stream a block through `STREAM_BUFFERS` one-expert chunks,
        and with a cache hold `cache_experts` slots (at least one) per MoE block besides."""
        c, e, eb = self.config, self.num_experts, self.expert_bytes
        if c.mode == "gpu-only":
            return self.num_moe_blocks * e * eb
        if c.mode == "prefetch-all":
            return 2 * e * eb
        cache = 0 if c.cache_policy is None else self.num_moe_blocks * (c.cache_experts or 1) * eb
        return cache + STREAM_BUFFERS * eb

    def _check_budget(self):
        c, need, eb = self.config, self.min_budget_bytes, self.expert_bytes
        if c.device_budget_bytes is None or c.device_budget_bytes >= need:
            return
        if c.mode == "gpu-only":
            what = f"every expert resident: {self.num_moe_blocks} MoE blocks x {self.num_experts} experts"
        elif c.mode == "prefetch-all":
            what = f"two whole MoE blocks: 2 x {self.num_experts} experts"
        else:
            what = f"{STREAM_BUFFERS} one-expert streaming buffers"
            if c.cache_policy is not None:
                what += f" + a cache of {c.cache_experts or 1} slot(s) x {self.num_moe_blocks} MoE blocks"
        raise ValueError(
            f"device_budget_bytes={c.device_budget_bytes} ({_gib(c.device_budget_bytes)}) is below the {need} bytes "
            f"({_gib(need)}) of expert buffers that mode {c.mode!r} needs on the device ({what}, {eb} bytes per "
            f"expert); allowed: >= {need} bytes. The budget bounds expert buffers only: the "
            f"{self._resident_bytes()} bytes ({_gib(self._resident_bytes())}) of non-expert weights stay on the "
            f"device besides it")

    def _check_chunk_budget(self):
        """A `prefill_chunk` given with a budget must fit it: its streaming buffers beside the cache."""
        c, eb = self.config, self.expert_bytes
        if c.device_budget_bytes is None or c.prefill_chunk is None or c.mode in ("gpu-only", "prefetch-all"):
            return
        need = self._cache_bytes() + STREAM_BUFFERS * self.chunk * eb
        if need > c.device_budget_bytes:
            raise ValueError(f"prefill_chunk={c.prefill_chunk} needs {need} bytes ({_gib(need)}) of expert buffers "
                             f"({STREAM_BUFFERS} chunks of {self.chunk} x {eb} bytes"
                             f"{' + the cache' if self.cache_slots else ''}), more than device_budget_bytes="
                             f"{c.device_budget_bytes}; allowed: at most "
                             f"{max(0, c.device_budget_bytes - self._cache_bytes()) // (STREAM_BUFFERS * eb)} experts")

    def _cache_bytes(self) -> int:
        return 0 if self.cache_slots is None else self.num_moe_blocks * self.cache_slots * self.expert_bytes

    def _resident_bytes(self) -> int:
        """Bytes of the weights kept on the device besides the experts."""
        blocks = [b for sp in (self.program.encoder, self.program.decoder) for b in sp.blocks if b.is_sparse]
        experts = sum(x.nbytes for b in blocks for x in jax.tree.leaves((b.host_wi, b.host_wo)))
        return sum(x.nbytes for x in jax.tree.leaves(self.program) if hasattr(x, "nbytes")) - experts

    def tables_exceed_budget(self, k: int) -> bool:
        """Whether a call's routed slot tables, `self.tables` of k slots each, would not fit the budget (routed
        modes without a cache, whose slots are filled in place): such a call streams each block in chunks."""
        b = self.config.device_budget_bytes
        return (b is not None and self.cache_slots is None and self.tables > 0
                and self.tables * k * self.expert_bytes > b)

    def expert_buffer_bytes(self, tokens: int, rows: int) -> int:
        """A bound on the expert tables a request allocates on the device besides those the engine keeps (gpu-only's
        resident experts and the cache's slots are in use already): its prefill routes `tokens` at once, its
        decode steps `rows`. The memory check of `generate` counts them."""
        c, e, eb = self.config, self.num_experts, self.expert_bytes
        if c.mode == "gpu-only":
            return 0
        if c.mode == "prefetch-all":
            return 2 * e * eb

        def call(k):
            k = min(e, k)
            dense = 2 * k >= e or self.tables_exceed_budget(k)
            if dense and self.chunk < e:
                return STREAM_BUFFERS * self.chunk * eb
            if dense and not self.dense_routed_only:
                return 2 * e * eb  # whole blocks, the current and the next
            return 0 if self.cache_slots is not None else self.tables * k * eb

        return max(call(tokens), call(rows))

    def _copy_method(self) -> str:
        method = self.config.copy_method
        if self.config.mode in ("gpu-only", "prefetch-all") or self.layout is not None:
            # nothing routed is copied (experts resident, or whole blocks); on a mesh, the copies are part of
            # the per-device program and the native copies serve one device
            return "xla"
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
        if c.device_budget_bytes is not None and c.mode not in ("gpu-only", "prefetch-all"):
            # two chunks in flight (double buffering) for the current and the next block, beside the cache;
            # without a cache, room for a call's routed tables too, so that a chunk of E copies routed tables
            per = STREAM_BUFFERS if self.cache_slots is not None else max(STREAM_BUFFERS, self.tables)
            left = c.device_budget_bytes - self._cache_bytes()
            return int(max(1, min(e, left // (per * self.expert_bytes))))
        return e

    # --- generation ---------------------------------------------------------------------------------
    def _flat_step(self, treedef, leaves, search, kv, cross, cross_bias, caches, key_positions, num_beams,
                   num_steps, guess):
        """`num_steps` decode steps (`_step`), the decoder program given as flat leaves (see __init__).

        -> (search, kv, caches, experts copied, [speculative hits, needed, wasted], guess, routing), counts
        summed over the steps; routing: (tokens [MoE blocks, E], co-activation [MoE blocks, E, E]) with
        `record_routing`, else None.
        """
        program = jax.tree.unflatten(treedef, leaves)
        step = functools.partial(self._step, program, cross=cross, cross_bias=cross_bias,
                                 key_positions=key_positions, num_beams=num_beams)
        if self.config.decode_steps_per_call == 1:  # the host checks for EOS (see `generate`)
            return step(search=search, kv=kv, caches=caches, guess=guess)

        def body(carry):
            n, search, kv, caches, copied, speculation, guess, routing = carry
            search, kv, caches, c, s, guess, r = step(search=search, kv=kv, caches=caches, guess=guess)
            return n + 1, search, kv, caches, copied + c, speculation + s, guess, jax.tree.map(jnp.add, routing, r)

        def more(carry):  # with stop_when_finished, a data-dependent exit: a device->host read per step
            n, search = carry[:2]
            if self.config.stop_when_finished:
                unfinished = ~jnp.all(search.finished)
                if self.layout is not None:  # every device runs as many steps: until every row of the mesh ends
                    unfinished = self.layout.any_device(unfinished)
                return (n < num_steps) & unfinished
            return n < num_steps

        routing = None
        if self.config.record_routing:
            blocks, e = self.num_moe_blocks, self.model_config.num_experts
            routing = (jnp.zeros((blocks, e), jnp.int32), jnp.zeros((blocks, e, e), jnp.int32))
        carry = (jnp.int32(0), search, kv, caches, jnp.int32(0), jnp.zeros((3,), jnp.int32), guess, routing)
        return jax.lax.while_loop(more, body, carry)[1:]

    def _step(self, program, search, kv, cross, cross_bias, caches, key_positions, num_beams, guess):
        """One decode step for every row, traced into a single jitted function (`_decode`).

        -> (search, kv, caches, copied, speculation, the next step's guess, routing or None)."""
        ctx = RunContext(caches, self.mem.on_device, guess=self._step_guess(guess, search))
        search, kv = self._decode(program, search, kv, cross, cross_bias, ctx, key_positions, num_beams)
        copied, speculation = ctx.totals()
        routing = ctx.routing(self.num_moe_blocks, self.model_config.num_experts)
        return search, kv, ctx.caches, copied, speculation, ctx.next_guess(search.last), routing

    def _decode(self, program, search, kv, cross, cross_bias, ctx, key_positions, num_beams):
        """One decode step, traced (`_step`) or dispatched block by block (the reference). -> (search, kv).

        The copies' order is the stack pass's (`fetch.CopyQueue`).
        """
        cfg, dec = self.model_config, program.decoder
        bias = dec.self_bias(search.step[None], key_positions, None)
        x = program.embed(search.last[:, None])  # [rows, 1, d]
        x, kv = StackPass(self, ctx, dec, x)(x, bias, cross=cross, cross_bias=cross_bias, caches=kv,
                                             cache_index=search.step)
        logits = program.logits(x)[:, -1]  # [rows, V]
        if num_beams == 1:
            return greedy_step(search, logits, cfg.pad_token_id, cfg.eos_token_id), kv
        search, origin = beam_step(search, logits, cfg.pad_token_id, cfg.eos_token_id)
        return search, reorder(kv, origin)

    @_one_call_at_a_time
    def generate(self, input_ids, attention_mask=None, *, max_new_tokens: int = 32, num_beams: int = 1,
                 length_penalty: float = 1.0, progress=None, track_memory: bool = False,
                 profile_blocks: bool = False, fused: bool = True) -> GenerationResult:
        """Greedy (num_beams=1) or beam search. input_ids [B, S] -> GenerationResult(tokens [B, T]).

        Each decode step (or `decode_steps_per_call` steps) is one jitted call (`fused`); `fused=False`
        dispatches every block separately (the reference path, and what `profile_blocks` uses).
        progress(step, total) is called after every dispatch. For measurements only: `track_memory` samples
        device bytes-in-use after every dispatch; `profile_blocks` synchronizes around every MoE block to time
        it (removing the overlap it measures). Calls from several threads run one at a time.
        """
        cfg, put = self.model_config, lambda a: jax.device_put(np.asarray(a, np.int32), self.mem.on_device)
        input_ids = np.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
        check_token_ids(input_ids, cfg.vocab_size)
        mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {input_ids.shape}")
        if max_new_tokens <= 0 or num_beams <= 0:
            raise ValueError(f"max_new_tokens and num_beams must be positive, got {max_new_tokens}, {num_beams}")
        check_generation_input(input_ids, mask)
        batch, rows = input_ids.shape[0], input_ids.shape[0] * num_beams
        if self.cache_slots is not None and self.cache_slots < min(rows, self.num_experts):
            raise ValueError(f"cache_experts={self.cache_slots} per block is less than the {rows} tokens a "
                             f"decode step may route (batch x beams); raise it or the budget")
        # on a mesh, each data group of devices holds batch / data rows (the batch padded to divide evenly)
        per_device = batch if self.layout is None else self.layout.padded_batch(batch) // self.layout.data
        check_request_fits(cfg, self.mem.device, per_device, input_ids.shape[1], max_new_tokens, num_beams,
                           self.expert_buffer_bytes(per_device * input_ids.shape[1], per_device * num_beams))
        if self.layout is not None and (profile_blocks or track_memory or not fused):
            raise ValueError("on a mesh the engine runs fused dispatches only: profile_blocks, track_memory and "
                             "fused=False need one device")
        fused = fused and not profile_blocks
        stats = RunStats.start(self, batch, num_beams, input_ids.shape[1], max_new_tokens)
        watch = Stopwatch()
        if self.layout is None:
            hidden, cross, cross_bias, kv, key_positions, search = self._prefill(
                put(input_ids), put(mask), num_beams, max_new_tokens, stats, track_memory, profile_blocks)
        else:
            rows_padded = self.layout.padded_batch(batch)
            hidden, cross, cross_bias, kv, key_positions, search = self._prefill_on_mesh(
                pad_rows(input_ids.astype(np.int32), rows_padded), pad_rows(mask.astype(np.int32), rows_padded),
                num_beams, max_new_tokens, stats)
        stats.mark_prefill_done(self)
        # A fused first decode dispatch is queued before the host waits for the prefill, so the device goes
        # from the prefill's last kernel straight into the decode loop instead of idling while the host
        # dispatches. The prefill's latency is read right after that dispatch; it includes the dispatch only
        # where the prefill finished first. Block-by-block decoding synchronizes as it goes, so there the
        # prefill is timed first.
        if not fused:
            stats.prefill_s = watch.lap(hidden)

        guess = self._first_guess(rows)
        t, finished = 0, None  # finished: the last check's all-finished flag, read one dispatch later
        while t < max_new_tokens:
            if self.copy_method == "dma":
                # A native copy that failed or timed out so far: raise before dispatching more steps that
                # would compute with whatever the lost copy left in its slots.
                native.check_device_wait()
            n = min(self.config.decode_steps_per_call, max_new_tokens - t) if fused else 1
            if fused:
                search, kv, self.caches, copied, speculation, guess, routing = self._decode_step(
                    self._decoder_leaves, search, kv, cross, cross_bias, self.caches, key_positions, num_beams, n,
                    guess)
                stats.add_copied(copied)
                stats.add_speculation(speculation)
                stats.add_routing(routing)
                if track_memory:
                    stats.sample_memory(self.mem.device)
                if t == 0:
                    stats.prefill_s = watch.lap(hidden)
            else:
                ctx = RunContext(self.caches, self.mem.on_device, stats, track_memory=track_memory,
                                 profile_blocks=profile_blocks, guess=self._step_guess(guess, search))
                search, kv = self._decode(self.program, search, kv, cross, cross_bias, ctx, key_positions,
                                          num_beams)
                self.caches, guess = ctx.flush_into(stats), ctx.next_guess(search.last)
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
            stats.add_speculation(G.discard(guess))
        # one transfer; steps run, not dispatched: a fused dispatch may stop early
        tokens, steps = jax.device_get((best_sequences(search, length_penalty), search.step))
        tokens, stats.steps = np.asarray(tokens)[:batch], int(steps)  # a mesh's padding rows dropped
        stats.decode_s = watch.lap()
        if self.copy_method == "dma":
            native.check_device_wait()  # the last dispatches' copies
        stats.finish(self)
        return GenerationResult(tokens, stats)

    def _prefill(self, ids, mask, num_beams, max_new_tokens, stats, track_memory, profile_blocks):
        """The prefill on one device, block by block (`encode_for_decoding`). ids, mask [B, S] on the device."""
        ctx = RunContext(self.caches, self.mem.on_device, stats, track_memory=track_memory,
                         profile_blocks=profile_blocks)
        out = self.encode_for_decoding(self.program, ctx, ids, mask, num_beams, max_new_tokens,
                                       lambda a: jax.device_put(a, self.mem.on_device))
        self.caches = ctx.flush_into(stats)
        return out

    def encode_for_decoding(self, program, ctx, ids, mask, num_beams, max_new_tokens, put):
        """The encoder over ids, mask [B, S], then what decoding starts from: cross-attention keys/values, the
        decoder's empty caches and the search state. `put` places host arrays where the pass runs (the engine's
        device; inside a mesh's per-device body, nothing to do). -> (hidden, cross, cross_bias, kv,
        key_positions, search)."""
        cfg, batch, enc = self.model_config, ids.shape[0], program.encoder
        positions = put(np.arange(ids.shape[1], dtype=np.int32))  # [S]
        x = program.embed(ids)  # [B, S, d]
        hidden, _ = StackPass(self, ctx, enc, x)(x, enc.self_bias(positions, positions, mask))
        if num_beams > 1:  # [B * K] rows, each input's beams together
            hidden, mask = reorder((hidden, mask), put(np.repeat(np.arange(batch, dtype=np.int32), num_beams)))
        cross = [cross_kv(b.graphdef, b.state, b.placeholder, hidden) for b in program.decoder.blocks]
        cross_bias = _padding_bias(mask)
        # zeroed self-attention caches, one distinct buffer per layer (the decode step donates them)
        kv = put(_zero_caches(batch * num_beams, cfg.num_heads, max_new_tokens, cfg.d_kv, cfg.dtype,
                              cfg.num_decoder_layers))
        key_positions = put(np.arange(max_new_tokens, dtype=np.int32))  # [T]
        search = init_search(batch, num_beams, max_new_tokens, cfg.decoder_start_token_id)
        return hidden, cross, cross_bias, kv, key_positions, search

    def _first_guess(self, rows: int) -> F.PendingSlots | None:
        """The first decode step's first-block guess, started (`guess.first`), or None where the engine
        does not guess: off by `guess_first_block`, a mode that copies no routed experts ahead, a cache,
        a step that needs most experts anyway, or a decoder without MoE blocks."""
        k = min(self.num_experts, rows)
        dec = self.program.decoder
        if (not self.config.guess_first_block or self.config.mode not in ("pregated", "speculative")
                or self.cache_slots is not None or 2 * k >= self.num_experts or not dec.moe_blocks
                or self.tables_exceed_budget(k)):
            return None
        return G.first(F.CopyQueue(self.mem.on_device), self.copy_method, dec.blocks[dec.moe_blocks[0]], k,
                       staging=self.guess_staging_key)

    def _step_guess(self, incoming: F.PendingSlots | None, search) -> G.StepGuess | None:
        return None if incoming is None else G.StepGuess(incoming, search.step, search.tokens.shape[-1],
                                                         staging=self.guess_staging_key)


def _gib(n: int) -> str:
    return f"{n / GIB:.3g} GiB"


def _warn_if_modules_load_lazily():
    """The native copies' done kernel spins until the copy worker enqueues its copies; a kernel's first
    launch under lazy module loading may wait for it (engine.xla_flags explains). Scripts set EAGER."""
    if os.environ.get("CUDA_MODULE_LOADING", "").upper() != "EAGER":
        warnings.warn("CUDA_MODULE_LOADING is not EAGER: with the native expert copies, a kernel's first launch "
                      "under lazy loading can stall the copies until they time out. Set CUDA_MODULE_LOADING=EAGER "
                      "before JAX starts (pregated_jax.engine.xla_flags.use_eager_module_loading).", stacklevel=4)


@jax.jit
def _padding_bias(mask):
    return visibility_bias(key_padding(mask))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _zero_caches(rows, heads, max_len, d_kv, dtype, layers):
    shape = (rows, heads, max_len, d_kv)
    return [KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(layers)]
