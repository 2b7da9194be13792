"""Plans a load-balanced expert placement over M devices from a routing trace and reports the balance.

  python scripts/plan_placement.py --trace trace.json --devices 4 [--method greedy|anticorrelated]
                                   [--weight 1.0] [--out placement.json] [--json report.json]
  python scripts/plan_placement.py --calibrate --checkpoint default --task debian [--split validation]
                                   --max_examples 500 --save_trace trace.json [--devices 4 --out placement.json]
  python scripts/plan_placement.py --synthetic [--blocks 12 --experts 128 --steps 256 --tokens 512 --zipf_a 0.8]
                                   --devices 8 [--save_trace trace.json]

--calibrate runs the model teacher-forced over the task's examples and records, per MoE block and batch,
the experts its real tokens go to (`pregated_jax.expert_placement.record_routing`). The placement JSON
({"blocks": {"encoder/1": perm, ...}}: slot p holds logical expert perm[p]) is what
`pregated_jax.expert_placement.apply_placement` takes. Prints, per block and overall, max/mean tokens per
device before (contiguous: device k holds experts k*E/M .. (k+1)*E/M - 1) and after, and a lower bound
that no placement with E/M experts per device (no replicas) beats (`placement_lower_bound`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

from pregated_jax.expert_placement import (METHODS, RoutingTrace, balance_report, placement_to_json,  # noqa: E402
                                           plan_placement, synthetic_trace)


def calibrate(checkpoint: str, task: str, split: str | None, max_examples: int, batch_size: int,
              max_input_len: int, max_target_len: int) -> RoutingTrace:
    from pregated_jax import data
    from pregated_jax.evaluation import load_examples
    from pregated_jax.expert_placement import record_routing
    from pregated_jax.loading import load_model

    model = load_model(checkpoint)
    examples, _, split = load_examples(task, split, max_examples)
    if not examples:
        raise ValueError(f"no examples in task {task!r}, split {split!r}")
    batches = data.batches(examples, data.default_tokenizer(), batch_size, max_input_len, max_target_len)
    return record_routing(model, batches, checkpoint=checkpoint, task=task, split=split, examples=len(examples),
                          batch_size=batch_size, max_input_len=max_input_len, max_target_len=max_target_len)


def markdown(report: dict) -> str:
    rows = [f"M = {report['num_devices']} devices: max/mean tokens per device",
            "| block | tokens | before (contiguous) | after | lower bound |", "| --- | --- | --- | --- | --- |"]
    for b, r in report["blocks"].items():
        rows.append(f"| {b} | {r['tokens']} | {r['before']:.3f} | {r['after']:.3f} | {r['bound']:.3f} |")
    o = report["overall"]
    rows.append(f"| overall | | {o['before']:.3f} | {o['after']:.3f} | |")
    co = report["coactivation_cost"]
    rows.append(f"co-activation cost (same-device pairs' co-firing steps): {co['before']:.0f} -> {co['after']:.0f}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", help="routing trace JSON (RoutingTrace.to_json)")
    src.add_argument("--calibrate", action="store_true", help="record a trace with a calibration pass")
    src.add_argument("--synthetic", action="store_true", help="generate a Zipf-skewed trace")
    ap.add_argument("--devices", type=int, help="M, devices on the mesh axis `expert` (must divide E)")
    ap.add_argument("--method", default="greedy", choices=METHODS)
    ap.add_argument("--weight", type=float, default=1.0, help="anticorrelated: co-activation penalty weight")
    ap.add_argument("--out", help="write the placement JSON here")
    ap.add_argument("--json", help="write the balance report JSON here")
    ap.add_argument("--save_trace", help="write the (calibration or synthetic) trace here")
    g = ap.add_argument_group("calibration")
    g.add_argument("--checkpoint", default="default")
    g.add_argument("--task", default="debian")
    g.add_argument("--split", default=None, help="default: the task's evaluation split")
    g.add_argument("--max_examples", type=int, default=500)
    g.add_argument("--batch_size", type=int, default=32)
    g.add_argument("--max_input_len", type=int, default=256)
    g.add_argument("--max_target_len", type=int, default=32)
    g = ap.add_argument_group("synthetic trace")
    g.add_argument("--blocks", type=int, default=12)
    g.add_argument("--experts", type=int, default=128)
    g.add_argument("--steps", type=int, default=256)
    g.add_argument("--tokens", type=int, default=512, help="tokens routed per block per step")
    g.add_argument("--zipf_a", type=float, default=0.8)
    g.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    for name in ("devices", "max_examples", "batch_size", "max_input_len", "max_target_len", "blocks",
                 "experts", "steps", "tokens"):
        value = getattr(a, name)
        if value is not None and value < 1:
            ap.error(f"--{name} must be >= 1, got {value}")
    if a.devices is None and not a.save_trace:
        ap.error("give --devices (to plan a placement) or --save_trace (to keep the trace only)")

    if a.calibrate:
        trace = calibrate(a.checkpoint, a.task, a.split, a.max_examples, a.batch_size, a.max_input_len,
                          a.max_target_len)
    elif a.synthetic:
        trace = synthetic_trace(a.blocks, a.experts, a.steps, a.tokens, a.zipf_a, a.seed)
    else:
        trace = RoutingTrace.load(a.trace)
    if a.save_trace:
        trace.save(a.save_trace)
    print(f"trace: {len(trace.counts)} MoE blocks, {trace.num_experts} experts, {trace.steps} steps")
    if a.devices is None:
        return 0
    if trace.num_experts % a.devices:
        ap.error(f"--devices {a.devices} does not divide the trace's {trace.num_experts} experts")
    placement = plan_placement(trace, a.devices, a.method, a.weight)
    report = balance_report(trace, placement, a.devices)
    print(f"method: {a.method}" + (f" (weight {a.weight})" if a.method == "anticorrelated" else ""))
    print(markdown(report))
    if a.out:
        Path(a.out).write_text(json.dumps(placement_to_json(placement, num_experts=trace.num_experts,
                                                            num_devices=a.devices, method=a.method)))
    if a.json:
        Path(a.json).write_text(json.dumps({**report, "method": a.method, "trace_meta": trace.meta}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
