"""Replays an expert-access trace through the reference cache simulator under each eviction policy.

  python scripts/cache_replay.py --trace trace.json --capacity 16 [--policies lru,lfu,lifo,fifo,belady]
                                 [--expert_bytes N] [--json out.json]
  python scripts/cache_replay.py --synthetic [--blocks 12 --experts 128 --steps 256 --tokens 4 --zipf_a 1.2]
                                 --capacity 16 [--save_trace trace.json]

Trace JSON: {"expert_bytes": int, "accesses": [[block_id, [expert ids...]], ...]}; block ids are any JSON
scalar (each block has its own cache). --expert_bytes overrides the trace's value. --capacity takes a comma
list to sweep. Prints a markdown table: capacity, policy, hit rate, misses, GB moved (1 GB = 1e9 bytes).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

from pregated_jax.engine.cache_sim import POLICIES, CapacityError, simulate  # noqa: E402

# One Switch-Base expert in bf16: wi (3072 x 768) + wo (768 x 3072), 2 bytes each.
SWITCH_BASE_EXPERT_BYTES = 2 * 768 * 3072 * 2


def synthetic_trace(blocks: int, experts: int, steps: int, tokens: int, zipf_a: float, seed: int) -> dict:
    """Zipf-like routing: each block ranks its experts by a random permutation; every step, each block sees
    `tokens` tokens, each routed to rank r with probability ~ 1/(r+1)^a; the access is the set of experts hit."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, experts + 1) ** zipf_a
    p /= p.sum()
    perms = [rng.permutation(experts) for _ in range(blocks)]
    accesses = []
    for _ in range(steps):
        for b in range(blocks):
            ranks = rng.choice(experts, size=tokens, p=p)
            accesses.append([f"block{b}", sorted({int(perms[b][r]) for r in ranks})])
    return {"expert_bytes": SWITCH_BASE_EXPERT_BYTES, "accesses": accesses,
            "synthetic": {"blocks": blocks, "experts": experts, "steps": steps, "tokens": tokens,
                          "zipf_a": zipf_a, "seed": seed}}


def replay(trace: dict, capacities: list[int], policies: list[str], expert_bytes: int | None = None) -> dict:
    eb = int(trace.get("expert_bytes", 0) if expert_bytes is None else expert_bytes)
    accesses = [(b, ids) for b, ids in trace["accesses"]]
    results = []
    for c in capacities:
        for pol in policies:
            s = simulate(accesses, c, pol, eb)
            results.append({**s.to_dict(), "gb_moved": s.bytes_moved / 1e9})
    return {"expert_bytes": eb, "accesses": len(accesses), "blocks": len({b for b, _ in accesses}),
            "max_needed": max((len(set(ids)) for _, ids in accesses), default=0), "results": results}


def markdown_table(report: dict) -> str:
    rows = ["| capacity | policy | hit rate | misses | GB moved |", "| --- | --- | --- | --- | --- |"]
    for r in report["results"]:
        rows.append(f"| {r['capacity']} | {r['policy']} | {r['hit_rate']:.4f} | {r['misses']} | "
                    f"{r['gb_moved']:.3f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", help="trace JSON file")
    src.add_argument("--synthetic", action="store_true", help="generate a Zipf-like trace instead")
    ap.add_argument("--capacity", required=True, help="slots per block (comma list to sweep)")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--expert_bytes", type=int, default=None, help="overrides the trace's expert_bytes")
    ap.add_argument("--json", help="write the report here")
    g = ap.add_argument_group("synthetic trace")
    g.add_argument("--blocks", type=int, default=12)
    g.add_argument("--experts", type=int, default=128)
    g.add_argument("--steps", type=int, default=256)
    g.add_argument("--tokens", type=int, default=4, help="tokens routed per block per step")
    g.add_argument("--zipf_a", type=float, default=1.2)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--save_trace", help="write the synthetic trace here")
    a = ap.parse_args(argv)

    policies = [p.strip() for p in a.policies.split(",") if p.strip()]
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        ap.error(f"unknown policies {unknown}; known: {', '.join(POLICIES)}")
    capacities = [int(c) for c in a.capacity.split(",")]
    if a.synthetic:
        trace = synthetic_trace(a.blocks, a.experts, a.steps, a.tokens, a.zipf_a, a.seed)
        if a.save_trace:
            Path(a.save_trace).write_text(json.dumps(trace))
    else:
        trace = json.loads(Path(a.trace).read_text())
    try:
        report = replay(trace, capacities, policies, a.expert_bytes)
    except CapacityError as e:
        print(f"cache_replay: {e}", file=sys.stderr)
        return 2
    report["source"] = "synthetic" if a.synthetic else a.trace
    if a.synthetic:
        report["synthetic"] = trace["synthetic"]
    print(f"{report['accesses']} accesses over {report['blocks']} blocks, max |needed| {report['max_needed']}, "
          f"expert_bytes {report['expert_bytes']}")
    print(markdown_table(report))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
