"""The reference expert-cache simulator: hand-worked traces per policy, Belady's optimality, the CLI."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from pregated_jax.engine.cache_sim import (POLICIES, CapacityError, ExpertCacheSim, block_futures,
                                           simulate)

REPO = Path(__file__).resolve().parent.parent

# Capacity 2. Block "a" has its own cache; block "b" (t=3, t=8) has another and only advances the clock.
HAND_TRACE = [("a", {1}), ("a", {2}), ("a", {2}), ("b", {7}), ("a", {1}), ("a", {3}), ("a", {2}),
              ("a", {1, 3}), ("b", {7}), ("a", {4}), ("a", {4}), ("a", {4}), ("a", {5})]
# Worked by hand; slot state written (expert, last_use, freq, insert_time), M = miss, H = hit.
# Common start: t0 1->s0 M (1,0,1,0); t1 2->s1 M (2,1,1,1); t2 2 H s1 (2,2,2,1); t3 b: 7->b.s0 M;
# t4 1 H s0 (1,4,2,0).  State before t5: s0=(1,4,2,0) s1=(2,2,2,1).
# LRU: t5 {3}: last_use 4 vs 2 -> evict s1: s1=(3,5,1,5). t6 {2}: lu 4 vs 5 -> evict s0: s0=(2,6,1,6).
#   t7 {1,3}: 1 misses, s1 holds 3 (needed) so the only candidate is s0: s0=(1,7,1,7); 3 H s1 (3,7,2,5).
#   t8 b H. t9 {4}: lu 7 vs 7 tie -> lowest slot s0: s0=(4,9,1,9). t10, t11 H s0 (4,11,3,9).
#   t12 {5}: lu 11 vs 7 -> evict s1.
# LFU: t5: freq 2 vs 2 tie -> last_use 4 vs 2 -> evict s1: s1=(3,5,1,5). t6: freq 2 vs 1 -> evict s1:
#   s1=(2,6,1,6). t7: 1 H s0 (1,7,3,0); 3 misses, only candidate s1: s1=(3,7,1,7). t9: freq 3 vs 1 -> s1:
#   s1=(4,9,1,9). t10, t11 H s1 (4,11,3,9). t12: freq 3 vs 3 tie -> last_use 7 vs 11 -> evict s0.
# LIFO: t5: insert 0 vs 1 -> evict the newest, s1: s1=(3,5,1,5). t6: insert 0 vs 5 -> s1: s1=(2,6,1,6).
#   t7: 1 H s0; 3 -> s1 (only candidate) ins 7. t9: ins 0 vs 7 -> s1 (ins 9). t10, t11 H s1.
#   t12: ins 0 vs 9 -> evict s1.
# FIFO: t5: ins 0 vs 1 -> evict the oldest, s0: s0=(3,5,1,5). t6 {2} H s1. t7: 1 misses, s0 holds 3
#   (needed) -> s1: s1=(1,7,1,7); 3 H s0. t9: ins 5 vs 7 -> s0 (ins 9). t10, t11 H s0. t12: ins 9 vs 7 -> s1.
# Belady: t5: block a's future is {2},{1,3},{4},{4},{4},{5}: 1 next at index 1, 2 at index 0 -> evict 1 (s0).
#   t6 H s1. t7: 1 -> s1 (only candidate); 3 H s0. t9: 3 and 1 never used again (inf, inf) -> lowest slot s0.
#   t10, t11 H s0. t12: 4 and 1 never again -> s0.
M, H = False, True
EXPECTED = {
    "lru": [[(1, 0, M)], [(2, 1, M)], [(2, 1, H)], [(7, 0, M)], [(1, 0, H)], [(3, 1, M)], [(2, 0, M)],
            [(1, 0, M), (3, 1, H)], [(7, 0, H)], [(4, 0, M)], [(4, 0, H)], [(4, 0, H)], [(5, 1, M)]],
    "lfu": [[(1, 0, M)], [(2, 1, M)], [(2, 1, H)], [(7, 0, M)], [(1, 0, H)], [(3, 1, M)], [(2, 1, M)],
            [(1, 0, H), (3, 1, M)], [(7, 0, H)], [(4, 1, M)], [(4, 1, H)], [(4, 1, H)], [(5, 0, M)]],
    "lifo": [[(1, 0, M)], [(2, 1, M)], [(2, 1, H)], [(7, 0, M)], [(1, 0, H)], [(3, 1, M)], [(2, 1, M)],
             [(1, 0, H), (3, 1, M)], [(7, 0, H)], [(4, 1, M)], [(4, 1, H)], [(4, 1, H)], [(5, 1, M)]],
    "fifo": [[(1, 0, M)], [(2, 1, M)], [(2, 1, H)], [(7, 0, M)], [(1, 0, H)], [(3, 0, M)], [(2, 1, H)],
             [(1, 1, M), (3, 0, H)], [(7, 0, H)], [(4, 0, M)], [(4, 0, H)], [(4, 0, H)], [(5, 1, M)]],
    "belady": [[(1, 0, M)], [(2, 1, M)], [(2, 1, H)], [(7, 0, M)], [(1, 0, H)], [(3, 0, M)], [(2, 1, H)],
               [(1, 1, M), (3, 0, H)], [(7, 0, H)], [(4, 0, M)], [(4, 0, H)], [(4, 0, H)], [(5, 0, M)]],
}
FINAL_SLOTS = {"lru": [4, 5], "lfu": [5, 4], "lifo": [1, 5], "fifo": [4, 5], "belady": [5, 1]}
EXPECTED_MISSES = {"lru": 8, "lfu": 8, "lifo": 8, "fifo": 7, "belady": 7}


@pytest.mark.parametrize("policy", POLICIES)
def test_hand_worked_trace(policy):
    sim = ExpertCacheSim(2, policy)
    futures = block_futures(HAND_TRACE)
    got = [sim.access(b, n, future=f if policy == "belady" else None) for (b, n), f in zip(HAND_TRACE, futures)]
    assert got == EXPECTED[policy]
    assert sim.slots("a") == FINAL_SLOTS[policy] and sim.slots("b") == [7, None]
    assert sim.clock == len(HAND_TRACE)
    st = simulate(HAND_TRACE, 2, policy, expert_bytes=10)
    assert (st.accesses, st.requests, st.misses) == (13, 14, EXPECTED_MISSES[policy])
    assert st.hits == 14 - st.misses and st.bytes_moved == 10 * st.misses
    assert (st.per_block["b"].hits, st.per_block["b"].misses, st.per_block["b"].accesses) == (1, 1, 2)
    assert st.per_block["a"].requests == 12 and st.hit_rate == pytest.approx(st.hits / 14)


def test_slot_metadata_and_empty_slots_fill_lowest_first():
    sim = ExpertCacheSim(3, "lru")
    assert sim.access("x", {5, 2}) == [(2, 0, M), (5, 1, M)]  # ascending ids, lowest empty slots
    assert sim.access("x", {5, 9}) == [(5, 1, H), (9, 2, M)]
    assert sim.slot_state("x") == {"expert": [2, 5, 9], "last_use": [0, 1, 1], "freq": [1, 2, 1],
                                   "insert_time": [0, 0, 1]}
    # Full: the victim is never an expert of the current access, even one inserted in this access.
    assert sim.access("x", {1, 2, 3}) == [(1, 1, M), (2, 0, H), (3, 2, M)]


def test_capacity_too_small_is_refused_without_changing_state():
    sim = ExpertCacheSim(2, "lfu")
    sim.access(0, {1})
    with pytest.raises(CapacityError, match=r"needs 3 distinct experts but the cache has capacity 2"):
        sim.access(0, {1, 2, 3})
    assert sim.clock == 1 and sim.slots(0) == [1, None]
    with pytest.raises(CapacityError, match="capacity >= max"):
        simulate([("a", [1]), ("a", [4, 5, 6])], 2, "lru")
    with pytest.raises(ValueError, match="needs `future`"):
        ExpertCacheSim(2, "belady").access(0, {1})


def _random_trace(rng, blocks, experts, n, max_needed):
    return [(rng.randrange(blocks), set(rng.sample(range(experts), rng.randint(1, max_needed))))
            for _ in range(n)]


@pytest.mark.parametrize("seed", range(12))
def test_belady_never_worse_and_stepwise_matches_simulate(seed):
    rng = random.Random(seed)
    capacity = rng.randint(2, 5)
    trace = _random_trace(rng, blocks=3, experts=10, n=150, max_needed=capacity)
    misses = {p: simulate(trace, capacity, p).misses for p in POLICIES}
    assert all(misses["belady"] <= m for m in misses.values()), misses
    # Belady's efficient next-use lookup in `simulate` agrees with explicit future lists in `access`.
    sim = ExpertCacheSim(capacity, "belady")
    for (b, n), f in zip(trace, block_futures(trace)):
        sim.access(b, n, future=f)
    assert sim.stats.misses == misses["belady"]
    assert sim.stats.to_dict() == simulate(trace, capacity, "belady").to_dict()


def test_cli_replays_a_trace_file(tmp_path):
    trace = {"expert_bytes": 500_000_000, "accesses": [[b, sorted(n)] for b, n in HAND_TRACE]}
    path, out = tmp_path / "trace.json", tmp_path / "out.json"
    path.write_text(json.dumps(trace))
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "cache_replay.py"), "--trace", str(path),
                           "--capacity", "2", "--json", str(out)], capture_output=True, text=True, check=True)
    assert "| capacity | policy | hit rate | misses | GB moved |" in proc.stdout
    assert "| 2 | fifo | 0.5000 | 7 | 3.500 |" in proc.stdout
    report = json.loads(out.read_text())
    assert {r["policy"]: r["misses"] for r in report["results"]} == EXPECTED_MISSES
    assert report["accesses"] == 13 and report["max_needed"] == 2
    bad = subprocess.run([sys.executable, str(REPO / "scripts" / "cache_replay.py"), "--trace", str(path),
                          "--capacity", "1", "--policies", "lru"], capture_output=True, text=True)
    assert bad.returncode == 2 and "capacity 1" in bad.stderr
