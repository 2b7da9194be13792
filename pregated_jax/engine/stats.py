"""Run statistics: latency, throughput, bytes moved host -> device, memory, cache and speculation."""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np


class Stopwatch:
    """Wall-clock laps; a lap waits for the given arrays first (device work is asynchronous)."""

    def __init__(self):
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
    speculative_hits: int | None = None
    speculative_needed: int | None = None
    peak_device_bytes: int | None = None
    _cache_baseline: tuple = (0, 0)
    _copied: list = dataclasses.field(default_factory=list, repr=False)
    _speculation: list = dataclasses.field(default_factory=list, repr=False)

    @classmethod
    def start(cls, engine, batch, beams, input_len, max_new_tokens) -> "RunStats":
        stats = cls(engine.config.mode, batch, beams, input_len, max_new_tokens, engine.expert_bytes)
        stats._cache_baseline = _cache_counters(engine)  # caches persist across runs
        return stats

    def add_copied(self, n):
        """n: a Python int (static copies) or a device scalar (data-dependent copies)."""
        self._copied.append(n)

    def add_speculation(self, pair):
        self._speculation.append(pair)

    def finish(self, engine):
        """Reads the device-side counters (one transfer, after the run)."""
        static = sum(n for n in self._copied if isinstance(n, int))
        dynamic = [n for n in self._copied if not isinstance(n, int)]
        self.experts_copied = static + int(sum(np.asarray(jax.device_get(dynamic)))) if dynamic else static
        if self._speculation:
            pairs = np.asarray(jax.device_get(self._speculation)).sum(0)
            self.speculative_hits, self.speculative_needed = int(pairs[0]), int(pairs[1])
        if engine.caches:
            hits, misses = _cache_counters(engine)
            self.cache_hits = hits - self._cache_baseline[0]
            self.cache_misses = misses - self._cache_baseline[1]
            self.experts_copied += self.cache_misses
        mem = engine.mem.device.memory_stats() or {}
        self.peak_device_bytes = mem.get("peak_bytes_in_use")
        self._copied, self._speculation = [], []

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
        )
        return d

    def table(self) -> str:
        """A two-column markdown table of the figures that matter."""
        d = self.as_dict()
        rows = [
            ("mode", d["mode"]), ("batch x beams", f"{self.batch} x {self.num_beams}"),
            ("input tokens", self.input_len), ("new tokens", d["new_tokens"]),
            ("prefill latency", f"{self.prefill_s * 1e3:.1f} ms"),
            ("decode", _rate(d["decode_tokens_per_s"])), ("end-to-end", _rate(d["end_to_end_tokens_per_s"])),
            ("experts copied", f"{self.experts_copied} ({self.bytes_moved / 1e9:.3f} GB)"),
            ("host->device", f"{d['h2d_gb_per_s']:.2f} GB/s" if d["h2d_gb_per_s"] else "-"),
            ("peak device memory", f"{self.peak_device_bytes / 2**30:.2f} GiB" if self.peak_device_bytes else "n/a"),
            ("cache hit rate", _pct(d["cache_hit_rate"])), ("speculative hit rate", _pct(d["speculative_hit_rate"])),
        ]
        return "\n".join(["| statistic | value |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows])


def _cache_counters(engine) -> tuple[int, int]:
    counters = jax.device_get([(c.hits, c.misses) for c in engine.caches.values()])
    return int(sum(h for h, _ in counters)), int(sum(m for _, m in counters))


def _rate(x):
    return f"{x:.1f} tok/s" if x else "-"


def _pct(x):
    return f"{100 * x:.1f}%" if x is not None else "-"
