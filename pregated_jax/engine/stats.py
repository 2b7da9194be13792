"""Run statistics: latency, throughput, bytes moved host -> device, memory, cache and speculation."""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np


class Stopwatch:
    """Wall-clock laps; a lap waits for the given arrays first (device work is asynchronous)."""

    def __init__(self, wait=None):
        if wait is not None:
            jax.block_until_ready(wait)
        self.t = time.perf_counter()

    def lap(self, *wait) -> float:
        if wait:
            jax.block_until_ready(wait)
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt


@dataclasses.dataclass
class RunStats:
    mode: str
    batch: int
    num_beams: int
    input_len: int
    max_new_tokens: int
    expert_bytes: int
    steps: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    experts_copied: int = 0
    cache_hits: int | None = None
    cache_misses: int | None = None
    speculative_hits: int | None = None  # experts a guess had copied when the gate asked for them
    speculative_needed: int | None = None  # experts needed where a guess was made
    speculative_wasted: int | None = None  # experts a guess copied that no token needed (no cache)
    peak_device_bytes: int | None = None  # the device's lifetime peak (includes model construction)
    sampled_peak_bytes: int | None = None  # max bytes-in-use seen during this run (track_memory)
    prefill_experts_copied: int = 0
    moe_block_s: list = dataclasses.field(default_factory=list)  # profile_blocks: per MoE block call
    track_memory: bool = False
    profile_blocks: bool = False
    copy_method: str | None = None  # "xla" or "dma", and the method of speculative misses if different
    expert_dtype: str = "bfloat16"  # the experts' format in host memory and in copies (a quantized format's name,
    # else the stacks' dtype); expert_bytes is its size
    # record_routing: tokens routed to each logical expert [MoE blocks][E] (encoder blocks first), and on a mesh
    # the tokens each device of the `expert` axis computed [MoE blocks][devices] (`routing_trace` has the rest)
    expert_tokens: list | None = None
    device_tokens: list | None = None
    routing_shape: tuple = dataclasses.field(default=(0, 0), repr=False)  # (MoE blocks, E) of the counts
    _cache_baseline: tuple = (0, 0)
    _cache_at_prefill: tuple = (0, 0)
    _prefill_mark: int = 0
    _prefill_speculation_mark: int = 0
    _decode_wasted: int = 0  # speculative_wasted of the decode steps alone
    _copied: list = dataclasses.field(default_factory=list, repr=False)
    _speculation: list = dataclasses.field(default_factory=list, repr=False)
    _routing: list = dataclasses.field(default_factory=list, repr=False)  # (counts, co-activation) per pass
    _coactivation: object = dataclasses.field(default=None, repr=False)  # [MoE blocks, E, E] int64

    @classmethod
    def start(cls, engine, batch, beams, input_len, max_new_tokens) -> "RunStats":
        stats = cls(engine.config.mode, batch, beams, input_len, max_new_tokens, engine.expert_bytes,
                    copy_method=_copy_methods(engine), expert_dtype=engine.expert_format)
        stats._cache_baseline = _cache_counters(engine)  # caches persist across runs
        stats.routing_shape = (engine.num_moe_blocks, engine.model_config.num_experts)
        return stats

    def add_copied(self, n):
        """n: a Python int (static copies) or a device scalar (data-dependent copies)."""
        self._copied.append(n)

    def sample_memory(self, device):
        used = (device.memory_stats() or {}).get("bytes_in_use")
        if used is not None:
            self.sampled_peak_bytes = max(self.sampled_peak_bytes or 0, used)

    def mark_prefill_done(self, engine):
        """Remembers which copies belong to the prefill (called once it is dispatched; does not wait for it)."""
        self._prefill_mark = len(self._copied)
        self._prefill_speculation_mark = len(self._speculation)
        self._cache_at_prefill = _cache_counter_sums(engine) if engine.caches else self._cache_baseline

    def add_speculation(self, pair):
        self._speculation.append(pair)

    def add_routing(self, routing):
        """routing: (tokens [blocks, E], co-activation [blocks, E, E]) device arrays of one or more passes, or None."""
        if routing is not None:
            self._routing.append(routing)

    def finish(self, engine):
        """Reads the device-side counters (one transfer, after the run)."""
        self.experts_copied = _total(self._copied)
        self.prefill_experts_copied = _total(self._copied[:self._prefill_mark])
        at_prefill = np.asarray(jax.device_get(self._cache_at_prefill))
        self.prefill_experts_copied += int(at_prefill[1]) - self._cache_baseline[1]
        if self._speculation:
            counts = np.asarray(jax.device_get(self._speculation))  # [calls, 3]
            hits, needed, wasted = counts.sum(0)
            if needed > 0:  # dense calls copy whole blocks and predict nothing
                self.speculative_hits, self.speculative_needed, self.speculative_wasted = (
                    int(hits), int(needed), int(wasted))
            self._decode_wasted = int(counts[self._prefill_speculation_mark:, 2].sum())
        if engine.caches:
            hits, misses = _cache_counters(engine)
            self.cache_hits = hits - self._cache_baseline[0]
            self.cache_misses = misses - self._cache_baseline[1]
            self.experts_copied += self.cache_misses
        if self._routing:
            counts, coactive = (np.sum(np.asarray(a, np.int64), axis=0) for a in zip(*jax.device_get(self._routing)))
            self.expert_tokens, self._coactivation = counts.tolist(), coactive
            if engine.layout is not None:
                self.device_tokens = _device_tokens(engine, counts).tolist()
        mem = engine.mem.device.memory_stats() or {}
        self.peak_device_bytes = mem.get("peak_bytes_in_use")
        self._copied, self._speculation, self._routing = [], [], []

    def routing_trace(self, model_config, trace=None, **meta):
        """The recorded routing (`record_routing`) as an `expert_placement.RoutingTrace` (added to `trace` when
        given): one step for the prefill and one per decode step."""
        from pregated_jax.expert_placement import RoutingTrace, moe_block_names

        if self.expert_tokens is None:
            raise ValueError("this run recorded no routing: create the engine with record_routing=True")
        names = moe_block_names(model_config)
        trace = trace or RoutingTrace.empty(model_config.num_experts, names, **meta)
        for b, name in enumerate(names):
            trace.counts[name] += np.asarray(self.expert_tokens[b], np.int64)
            trace.coactivation[name] += self._coactivation[b]
        trace.steps += 1 + self.steps
        return trace

    # --- derived figures --------------------------------------------------------------------------
    @property
    def new_tokens(self) -> int:
        return self.batch * self.steps

    @property
    def bytes_moved(self) -> int:
        return self.experts_copied * self.expert_bytes

    def as_dict(self) -> dict:
        total = self.prefill_s + self.decode_s
        d = {k: v for k, v in dataclasses.asdict(self).items() if not k.startswith("_")}
        d.update(
            new_tokens=self.new_tokens,
            decode_tokens_per_s=self.new_tokens / self.decode_s if self.decode_s else None,
            end_to_end_tokens_per_s=self.new_tokens / total if total else None,
            bytes_moved=self.bytes_moved,
            h2d_gb_per_s=self.bytes_moved / total / 1e9 if total else None,
            cache_hit_rate=(self.cache_hits / (self.cache_hits + self.cache_misses)
                            if self.cache_hits is not None and self.cache_hits + self.cache_misses else None),
            speculative_hit_rate=(self.speculative_hits / self.speculative_needed
                                  if self.speculative_needed else None),
            decode_bytes_moved=(self.experts_copied - self.prefill_experts_copied) * self.expert_bytes,
            # what must move: the bytes moved less the guesses' wasted copies (the roofline's numerator)
            decode_bytes_needed=(self.experts_copied - self.prefill_experts_copied
                                 - self._decode_wasted) * self.expert_bytes,
            moe_block_ms=(1e3 * sum(self.moe_block_s) / len(self.moe_block_s) if self.moe_block_s else None),
        )
        d.pop("moe_block_s")
        return d

    def table(self) -> str:
        """A two-column markdown table of the figures that matter."""
        d = self.as_dict()
        rows = [
            ("mode", f"{d['mode']} (copies: {self.copy_method})"), ("batch x beams", f"{self.batch} x {self.num_beams}"),
            ("input tokens", self.input_len), ("new tokens", d["new_tokens"]),
            ("prefill latency", f"{self.prefill_s * 1e3:.1f} ms"),
            ("decode", _rate(d["decode_tokens_per_s"])), ("end-to-end", _rate(d["end_to_end_tokens_per_s"])),
            ("experts copied", f"{self.experts_copied} x {self.expert_bytes / 1e6:.3f} MB {self.expert_dtype} "
                               f"({self.bytes_moved / 1e9:.3f} GB)"),
            ("host->device", f"{d['h2d_gb_per_s']:.2f} GB/s" if d["h2d_gb_per_s"] else "-"),
            ("peak device memory", f"{self.peak_device_bytes / 2**30:.2f} GiB" if self.peak_device_bytes else "n/a"),
            ("cache hit rate", _pct(d["cache_hit_rate"])), ("speculative hit rate", _pct(d["speculative_hit_rate"])),
        ]
        if d["moe_block_ms"] is not None:
            rows.insert(6, ("MoE block latency (synchronized)", f"{d['moe_block_ms']:.2f} ms"))
        return "\n".join(["| statistic | value |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows])


def _device_tokens(engine, counts: np.ndarray) -> np.ndarray:
    """Tokens each device of the mesh's `expert` axis computed, per MoE block: counts [blocks, E] (logical) ->
    [blocks, devices], through each block's placement (stack row p on device p // E_loc)."""
    program, e_loc = engine.program, engine.layout.local_experts
    blocks = [sp.blocks[i] for sp in (program.encoder, program.decoder) for i in sp.moe_blocks]
    out = np.zeros((len(blocks), engine.layout.expert), np.int64)
    for b, block in enumerate(blocks):
        rows = (np.arange(counts.shape[1]) if block.phys_of_logical is None
                else np.asarray(jax.device_get(block.phys_of_logical)))  # [E] stack row of each logical expert
        np.add.at(out[b], rows // e_loc, counts[b])
    return out


def _total(counts) -> int:
    """Sums Python ints and device scalars (the latter in one transfer)."""
    dynamic = [n for n in counts if not isinstance(n, int)]
    total = sum(n for n in counts if isinstance(n, int))
    return total + (int(np.sum(jax.device_get(dynamic))) if dynamic else 0)


def _cache_counters(engine) -> tuple[int, int]:
    """(hits, misses) summed over the caches, on the host (waits for the device)."""
    if not engine.caches:
        return 0, 0
    hits, misses = jax.device_get(_cache_counter_sums(engine))
    return int(hits), int(misses)


def _cache_counter_sums(engine) -> jax.Array:
    """(hits, misses) summed over the caches, as a new device array [2] (the caches' own counters are donated
    to the next decode step); without waiting for the device."""
    return _sum_pairs([(c.hits, c.misses) for c in engine.caches.values()])


@jax.jit
def _sum_pairs(pairs):
    # a cache's counters are scalars, or one per device on a mesh ([devices]): summed either way
    return jnp.stack([sum(jnp.sum(h) for h, _ in pairs), sum(jnp.sum(m) for _, m in pairs)])


def _rate(x):
    return f"{x:.1f} tok/s" if x else "-"


def _pct(x):
    return f"{100 * x:.1f}%" if x is not None else "-"


def _copy_methods(engine) -> str:
    if engine.miss_copy_method == engine.copy_method:
        return engine.copy_method
    return f"{engine.copy_method}, speculative misses: {engine.miss_copy_method}"
