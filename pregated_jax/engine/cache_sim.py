"""Reference simulator of a per-MoE-block expert cache (pure Python, written to be obviously correct).

The device-side cache is checked against this slot by slot, so the semantics are exact:

- Each MoE block has its own cache of `capacity` slots (0..C-1), initially empty.
- A trace is a sequence of accesses `(block_id, needed)`, `needed` a set of expert ids. A global clock t
  counts accesses (the first access has t = 0); all ids of one access share its t. Ids are processed in
  ascending order.
- Hit: the slot's last_use = t, freq += 1. Miss (= one fetch): the lowest-index empty slot if there is one;
  otherwise a victim among the slots whose expert is not in this access's `needed` (the current access's
  experts are never evicted, including those inserted or hit earlier in the same access), chosen by policy:
    lru     smallest last_use
    lfu     smallest freq, then smallest last_use
    lifo    largest insert_time (most recently inserted)
    fifo    smallest insert_time
    belady  farthest next use in this block's later accesses (never again = infinity)
  remaining ties by the lowest slot index. The inserted slot gets last_use = t, freq = 1, insert_time = t.
- An access needing more distinct experts than there are slots is refused (`CapacityError`) before any state
  changes: size the cache with capacity >= max |needed|.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections import defaultdict
from typing import Callable, Hashable, Iterable, Sequence

POLICIES = ("lru", "lfu", "lifo", "fifo", "belady")

BlockId = Hashable
Access = tuple[BlockId, Iterable[int]]
NextUse = Callable[[int], float]  # expert id -> distance to its next use in this block (inf = never)


class CapacityError(ValueError):
    """An access needs more distinct experts than the cache has slots."""


@dataclasses.dataclass
class BlockStats:
    accesses: int = 0
    requests: int = 0  # sum of |needed|
    hits: int = 0
    misses: int = 0  # = fetches
    bytes_moved: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "hit_rate": self.hit_rate}


@dataclasses.dataclass
class CacheStats:
    capacity: int
    policy: str
    expert_bytes: int
    per_block: dict[BlockId, BlockStats]

    def _sum(self, field: str) -> int:
        return sum(getattr(b, field) for b in self.per_block.values())

    accesses = property(lambda self: self._sum("accesses"))
    requests = property(lambda self: self._sum("requests"))
    hits = property(lambda self: self._sum("hits"))
    misses = property(lambda self: self._sum("misses"))
    bytes_moved = property(lambda self: self._sum("bytes_moved"))

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    def to_dict(self) -> dict:
        return {"capacity": self.capacity, "policy": self.policy, "expert_bytes": self.expert_bytes,
                "accesses": self.accesses, "requests": self.requests, "hits": self.hits, "misses": self.misses,
                "bytes_moved": self.bytes_moved, "hit_rate": self.hit_rate,
                "per_block": {str(k): v.to_dict() for k, v in self.per_block.items()}}


class _BlockCache:
    """The C slots of one block: which expert each holds (None = empty) and the policy metadata."""

    def __init__(self, capacity: int):
        self.expert: list[int | None] = [None] * capacity
        self.last_use = [0] * capacity
        self.freq = [0] * capacity
        self.insert_time = [0] * capacity

    def slot_of(self, expert_id: int) -> int | None:
        return self.expert.index(expert_id) if expert_id in self.expert else None


class ExpertCacheSim:
    """Stepwise simulator: feed accesses one at a time, read back where each expert landed."""

    def __init__(self, capacity: int, policy: str, expert_bytes: int = 0):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")
        self.capacity, self.policy, self.expert_bytes = capacity, policy, expert_bytes
        self.clock = 0  # t of the next access
        self._blocks: dict[BlockId, _BlockCache] = {}
        self._stats: dict[BlockId, BlockStats] = {}

    def slots(self, block_id: BlockId) -> list[int | None]:
        """The expert held by each slot of a block (None = empty)."""
        return list(self._blocks[block_id].expert) if block_id in self._blocks else [None] * self.capacity

    def slot_state(self, block_id: BlockId) -> dict[str, list]:
        """Per-slot expert, last_use, freq and insert_time of a block (for slot-by-slot comparisons)."""
        b = self._blocks.get(block_id) or _BlockCache(self.capacity)
        return {"expert": list(b.expert), "last_use": list(b.last_use), "freq": list(b.freq),
                "insert_time": list(b.insert_time)}

    @property
    def stats(self) -> CacheStats:
        return CacheStats(self.capacity, self.policy, self.expert_bytes,
                          {k: dataclasses.replace(v) for k, v in self._stats.items()})

    def access(self, block_id: BlockId, needed: Iterable[int],
               future: Sequence[Iterable[int]] | None = None) -> list[tuple[int, int, bool]]:
        """Processes one access; returns [(expert_id, slot, hit)] in ascending expert id order.

        `future` (Belady only): the `needed` sets of this block's later accesses, in order.
        """
        if self.policy == "belady":
            if future is None:
                raise ValueError("policy 'belady' needs `future`: this block's later needed sets, in order")
            future_sets = [set(f) for f in future]

            def next_use(expert_id: int) -> float:
                return next((i for i, f in enumerate(future_sets) if expert_id in f), math.inf)
        else:
            next_use = None
        return self._access(block_id, needed, next_use)

    def _access(self, block_id: BlockId, needed: Iterable[int], next_use: NextUse | None):
        needed = set(needed)
        if len(needed) > self.capacity:
            raise CapacityError(
                f"block {block_id!r} at t={self.clock}: the access needs {len(needed)} distinct experts but the "
                f"cache has capacity {self.capacity}; size capacity >= max |needed|")
        cache = self._blocks.setdefault(block_id, _BlockCache(self.capacity))
        stats = self._stats.setdefault(block_id, BlockStats())
        t = self.clock
        result = []
        for e in sorted(needed):
            s = cache.slot_of(e)
            hit = s is not None
            if hit:
                cache.last_use[s] = t
                cache.freq[s] += 1
                stats.hits += 1
            else:
                s = self._free_or_victim(cache, needed, next_use, block_id)
                cache.expert[s], cache.last_use[s], cache.freq[s], cache.insert_time[s] = e, t, 1, t
                stats.misses += 1
                stats.bytes_moved += self.expert_bytes
            result.append((e, s, hit))
        stats.accesses += 1
        stats.requests += len(needed)
        self.clock += 1
        return result

    def _free_or_victim(self, cache: _BlockCache, needed: set[int], next_use: NextUse | None,
                        block_id: BlockId) -> int:
        if None in cache.expert:
            return cache.expert.index(None)  # lowest-index empty slot
        candidates = [s for s in range(self.capacity) if cache.expert[s] not in needed]
        if not candidates:  # unreachable after the check in _access; kept as a guard
            raise CapacityError(f"block {block_id!r}: every slot holds an expert of the current access")
        key = {
            "lru": lambda s: (cache.last_use[s], s),
            "lfu": lambda s: (cache.freq[s], cache.last_use[s], s),
            "lifo": lambda s: (-cache.insert_time[s], s),
            "fifo": lambda s: (cache.insert_time[s], s),
            "belady": lambda s: (-next_use(cache.expert[s]), s),
        }[self.policy]
        return min(candidates, key=key)


def _normalize(trace: Iterable[Access]) -> list[tuple[BlockId, frozenset[int]]]:
    return [(b, frozenset(int(e) for e in needed)) for b, needed in trace]


def simulate(trace: Iterable[Access], capacity: int, policy: str, expert_bytes: int = 0) -> CacheStats:
    """Replays a whole trace; Belady's future is read from the trace itself."""
    accesses = _normalize(trace)
    sim = ExpertCacheSim(capacity, policy, expert_bytes)
    # Per block: the position of each access in that block's sequence, and per expert its sorted positions.
    position: list[int] = []
    uses: dict[BlockId, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    count: dict[BlockId, int] = defaultdict(int)
    for b, needed in accesses:
        position.append(count[b])
        for e in needed:
            uses[b][e].append(count[b])
        count[b] += 1
    for (b, needed), pos in zip(accesses, position):
        next_use = None
        if policy == "belady":
            def next_use(e: int, b=b, pos=pos) -> float:
                u = uses[b][e]
                i = bisect.bisect_right(u, pos)
                return u[i] - pos - 1 if i < len(u) else math.inf  # same ordering as ExpertCacheSim.access
        sim._access(b, needed, next_use)
    return sim.stats


def block_futures(trace: Iterable[Access]) -> list[list[frozenset[int]]]:
    """For each access of a trace, the needed sets of the later accesses of the same block (for `access`)."""
    accesses = _normalize(trace)
    return [[n for b2, n in accesses[i + 1:] if b2 == b] for i, (b, _) in enumerate(accesses)]
