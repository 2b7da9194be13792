"""Inference throughput against the device mesh: the engine (`InferenceEngine(..., mesh=)`) per mesh shape,
engine mode and expert placement, with each device's load. The "infer" sweep of `scripts/mesh_benchmark.py`
(`pregated_jax.bench.mesh_train` holds the arguments, the devices and the report).

For each mesh shape (data x expert), one unplaced row per mode, then the placed rows:
  1. a random model (`--preset`, seed `--seed`, experts built in host memory; `--skew` skews its routers);
  2. the engine on the mesh, with `record_routing` on in every row (so every row pays its few small kernels);
  3. a request of `global_batch` random sequences of `--input_len` tokens, `--new_tokens` decode steps
     (`stop_when_finished` off: every row runs every step), run once to compile, then `--repeats` times; the
     best end-to-end run is reported;
  4. the load: tokens each position of the `expert` axis computed per MoE block (`RunStats.device_tokens`).
A placed row ("greedy", "anticorrelated") plans its placement from the routing the unplaced row of the same
shape recorded (`RunStats.routing_trace`, `plan_placement`), applies it to a fresh model (`apply_placement`),
and runs the same request. Efficiency: decode tokens/s per device over the fewest-devices unplaced row of the
same mode.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from pregated_jax.bench.mesh_train import global_batch, mesh_shapes, model_config, skew_routers

MODES = ("gpu-only", "on-demand", "prefetch-all", "pregated", "speculative")


def add_infer_flags(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("inference sweep (--sweeps infer)")
    g.add_argument("--modes", nargs="+", default=["gpu-only", "pregated"], choices=MODES,
                   help="engine modes (speculative needs --routing conventional)")
    g.add_argument("--new_tokens", type=int, default=16, help="decode steps per request")


def _model(a, cfg, placement: dict | None):
    from pregated_jax.bench.random_model import random_model
    from pregated_jax.expert_placement import apply_placement

    model = random_model(cfg, seed=a.seed, experts_on_host=True)
    skew_routers(model, a.skew, a.seed)
    if placement is not None:
        apply_placement(model, placement)
    return model


def infer_row(a, cfg, shape: tuple[int, int], mode: str, method: str, placement: dict | None, log) -> dict:
    """One mesh shape, mode and placement: compile, time, read the load. The row keeps the routing trace's
    JSON under "_trace" for the placed rows to plan from."""
    import jax

    import pregated_jax as pj
    from pregated_jax.engine import EngineConfig, InferenceEngine

    data, expert = shape
    mesh = pj.make_mesh(data, expert)
    batch = global_batch(a, shape)
    config = EngineConfig(mode=mode, record_routing=True, stop_when_finished=False)
    engine = InferenceEngine(_model(a, cfg, placement), config, mesh=None if mesh.size == 1 else mesh)
    ids = np.random.default_rng(a.seed).integers(2, cfg.vocab_size, (batch, a.input_len), dtype=np.int32)
    engine.generate(ids, max_new_tokens=a.new_tokens)  # compiles
    runs = [engine.generate(ids, max_new_tokens=a.new_tokens).stats for _ in range(a.repeats)]
    best = min(runs, key=lambda s: s.prefill_s + s.decode_s)
    d = best.as_dict()
    loads = np.asarray(best.device_tokens if best.device_tokens is not None
                       else np.asarray(best.expert_tokens).sum(1, keepdims=True))  # [MoE blocks, expert devices]
    means = loads.mean(1)
    row = {"mesh": f"{data}x{expert}", "data": data, "expert": expert, "devices": data * expert, "mode": mode,
           "placement": method, "global_batch": batch, "input_len": a.input_len, "new_tokens": a.new_tokens,
           "prefill_s": best.prefill_s, "decode_s": best.decode_s,
           "decode_tokens_per_s": d["decode_tokens_per_s"], "end_to_end_tokens_per_s": d["end_to_end_tokens_per_s"],
           "decode_tokens_per_s_per_device": d["decode_tokens_per_s"] / (data * expert),
           "end_to_end_tokens_per_s_per_device": d["end_to_end_tokens_per_s"] / (data * expert),
           "decode_tokens_per_s_runs": [s.as_dict()["decode_tokens_per_s"] for s in runs],
           "experts_copied": best.experts_copied, "bytes_moved": d["bytes_moved"],
           "load": {"devices": loads.tolist(), "max_over_mean": float(loads.max(1).sum() / means.sum())},
           "_trace": best.routing_trace(cfg).to_json()}
    log(f"  {row['mesh']:>5} {mode:<13} {method:<14} decode {row['decode_tokens_per_s']:9.1f} tok/s, "
        f"load max/mean {row['load']['max_over_mean']:.3f}")
    jax.clear_caches()  # a new model's functions per row: keep the compiled ones from piling up
    return row


def infer_sweep(a: argparse.Namespace, log=print, on_row=None) -> dict:
    """Every mesh shape x mode, unplaced, then each placement method planned from that shape's unplaced routing
    (expert >= 2 only). -> {"config", "rows", "reference"}; a row that raises is kept with its error."""
    import jax

    from pregated_jax.expert_placement import RoutingTrace, plan_placement

    cfg = model_config(a)
    if not a.global_batch and not a.per_device_batch:
        a.per_device_batch = 2
    shapes = mesh_shapes(a, len(jax.devices()))
    log(f"infer sweep: preset {a.preset} ({cfg.num_experts} experts, {cfg.routing}), modes {', '.join(a.modes)}, "
        f"{len(shapes)} mesh shapes, placements {', '.join(a.placement)}")
    config = {"model": dataclasses.asdict(cfg), "preset": a.preset, "skew": a.skew, "modes": a.modes,
              "scaling": "strong" if a.global_batch else "weak", "per_device_batch": a.per_device_batch,
              "global_batch": a.global_batch, "input_len": a.input_len, "new_tokens": a.new_tokens,
              "repeats": a.repeats, "placement": a.placement, "seed": a.seed,
              "data": "random token ids, no padding; every row runs every decode step"}
    result = {"config": config, "rows": [], "reference": None}
    for shape in shapes:
        for mode in a.modes:
            for method in [m for m in a.placement if m == "none" or shape[1] > 1]:
                log(f"mesh {shape[0]}x{shape[1]}, mode {mode}, placement {method} ...")
                try:
                    placement = None
                    if method != "none":
                        unplaced = next(r for r in result["rows"] if (r["data"], r["expert"]) == shape
                                        and r["mode"] == mode and r["placement"] == "none" and "error" not in r)
                        placement = plan_placement(RoutingTrace.from_json(unplaced["_trace"]), shape[1], method)
                    row = infer_row(a, cfg, shape, mode, method, placement, log)
                except Exception as e:  # noqa: BLE001  (one failed row, e.g. out of memory, keeps the others)
                    row = {"mesh": f"{shape[0]}x{shape[1]}", "data": shape[0], "expert": shape[1],
                           "devices": shape[0] * shape[1], "mode": mode, "placement": method,
                           "error": f"{type(e).__name__}: {e}"[:4000]}
                    log(f"  FAILED: {row['error'][:500]}")
                result["rows"].append(row)
                _add_efficiency(result)
                if on_row is not None:
                    on_row(result)
    return result


def _add_efficiency(result: dict) -> None:
    done = [r for r in result["rows"] if "error" not in r]
    for mode in {r["mode"] for r in done}:
        rows = [r for r in done if r["mode"] == mode]
        fewest = min(r["devices"] for r in rows)
        ref = next((r for r in rows if r["devices"] == fewest and r["placement"] == "none"), rows[0])
        for r in rows:
            r["scaling_efficiency"] = r["decode_tokens_per_s_per_device"] / ref["decode_tokens_per_s_per_device"]
            r["end_to_end_scaling_efficiency"] = (r["end_to_end_tokens_per_s_per_device"]
                                                  / ref["end_to_end_tokens_per_s_per_device"])
    result["reference"] = "per mode: the fewest-devices unplaced row"


def public(result: dict) -> dict:
    """The result without the rows' routing traces (kept in memory for planning only)."""
    return {**result, "rows": [{k: v for k, v in r.items() if not k.startswith("_")} for r in result["rows"]]}


def infer_table(result: dict) -> str:
    rows = ["| mesh | devices | mode | placement | global batch | prefill ms | decode tok/s | end-to-end tok/s | "
            "end-to-end tok/s/device | efficiency (decode, end-to-end) | experts copied | load max/mean |",
            "| --- " * 12 + "|"]
    for r in result["rows"]:
        if "error" in r:
            rows.append(f"| {r['mesh']} | {r['devices']} | {r['mode']} | {r['placement']} | failed: "
                        f"{r['error'].splitlines()[0][:120]} |" + " |" * 7)
            continue
        rows.append(f"| {r['mesh']} | {r['devices']} | {r['mode']} | {r['placement']} | {r['global_batch']} | "
                    f"{1e3 * r['prefill_s']:.1f} | {r['decode_tokens_per_s']:.1f} | "
                    f"{r['end_to_end_tokens_per_s']:.1f} | {r['end_to_end_tokens_per_s_per_device']:.1f} | "
                    f"{r['scaling_efficiency']:.3f}, {r['end_to_end_scaling_efficiency']:.3f} | "
                    f"{r['experts_copied']} | {r['load']['max_over_mean']:.3f} |")
    return "\n".join(rows)
