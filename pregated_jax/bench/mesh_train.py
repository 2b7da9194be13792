"""Training throughput against the device mesh: weak (or strong) scaling, expert placement off and on,
per-device expert load. `scripts/mesh_benchmark.py` is the command line; this module holds the logic.

For each mesh shape (data x expert) and each placement method, one row:
  1. a model (`--preset`, random init, seed `--seed`; optionally a skewed router, `--skew`) is placed on the
     mesh with `shard_model`;
  2. placement other than "none": a routing trace of the first `--calib_steps` warmup batches (an eval-mode
     forward pass, `record_routing`) is planned into a placement (`plan_placement`) and applied
     (`apply_placement`) before the train state is built;
  3. `--warmup` train steps (the first one compiles), then `--repeats` windows of `--steps` timed steps, each
     window ended by one host sync; steps/s is the best window's;
  4. the per-device expert load: the routing of the first `--load_steps` timed batches (eval-mode forward
     of the final params, `record_routing`: dispatched, kept tokens), summed per position on the `expert`
     axis (the devices of every `data` row at one position hold the same experts), per MoE block.
The train step is `pregated_jax.train.loop.make_train_step` (the one `scripts/train.py` runs), with the
batch's rows split over data x expert (`batch_sharding`), as `train_and_evaluate` does on a mesh. Batches
are synthetic: uniform random tokens, every position real (no padding), drawn per step from `--seed`, so a
given step's global batch is the same on every mesh of the same global batch size. They are put on the
devices before the timed window (the timing covers the step, not the input pipeline).

Scaling efficiency of a row: its tokens/s per device over the reference row's (the fewest devices,
placement none): 1.0 is linear scaling. Tokens are encoder + decoder positions of the global batch.

The sweep functions return rows (dicts); `main` writes them under the sweep's name ("train") in
results.json, so that another sweep (inference tokens/s on the mesh) can be added as a sibling function.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path

import numpy as np

PLACEMENTS = ("none", "greedy", "anticorrelated")
SWEEPS = ("train", "infer")  # "infer": `pregated_jax.bench.mesh_infer`
# XLA:CPU collectives abort after 40 s at a rendezvous by default; fake devices on a few busy cores can
# starve one device's thread that long (tests/fake_devices.py raises the same limits).
PATIENT_COLLECTIVES = ("--xla_cpu_collective_call_terminate_timeout_seconds=900 "
                       "--xla_cpu_collective_timeout_seconds=900")


# --- arguments ---------------------------------------------------------------------------------------------

def parse_mesh_shape(text: str) -> tuple[int, int]:
    """'2x4' -> (data=2, expert=4)."""
    m = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if not m or int(m[1]) < 1 or int(m[2]) < 1:
        raise argparse.ArgumentTypeError(f"mesh shape {text!r}: expected DATAxEXPERT with positive sizes, e.g. 2x4")
    return int(m[1]), int(m[2])


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweeps", nargs="+", default=["train"], choices=SWEEPS, help="what to measure")
    shapes = ap.add_mutually_exclusive_group()
    shapes.add_argument("--meshes", nargs="+", type=parse_mesh_shape, metavar="DxE",
                        help="mesh shapes data x expert, e.g. 1x1 1x2 2x2 1x8")
    shapes.add_argument("--devices", nargs="+", type=int, metavar="N",
                        help="device counts, each an expert-parallel mesh 1xN (default: 1, 2, 4, ... up to "
                             "all devices)")
    ap.add_argument("--cpu_devices", type=int, help="N fake CPU devices (set before JAX starts); default: the "
                                                    "real devices")
    g = ap.add_argument_group("model")
    g.add_argument("--preset", default="tiny", help="a preset of pregated_jax.config (tiny, switch-base-64, ...)")
    g.add_argument("--num_experts", type=int, help="override the preset's number of experts")
    g.add_argument("--routing", default="pregated", choices=("pregated", "conventional"))
    g.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default: the preset's)")
    g.add_argument("--dropout_rate", type=float, help="default: the preset's")
    g.add_argument("--skew", type=float, default=0.0,
                   help="skewed router: each router's column for the expert of rank r (a random order per "
                        "router) is scaled by 1 / (r + 1)^skew, so low ranks win the argmax more often; 0: off")
    g.add_argument("--collective", default="auto", choices=("auto", "ragged", "dense"))
    g = ap.add_argument_group("batch and steps")
    batch = g.add_mutually_exclusive_group()
    batch.add_argument("--per_device_batch", type=int, help="weak scaling: sequences per device (default 2)")
    batch.add_argument("--global_batch", type=int, help="strong scaling: the same global batch on every mesh")
    g.add_argument("--input_len", type=int, default=32)
    g.add_argument("--target_len", type=int, default=32)
    g.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first compiles)")
    g.add_argument("--steps", type=int, default=5, help="timed steps per window")
    g.add_argument("--repeats", type=int, default=1, help="timed windows; the best one is reported")
    g.add_argument("--placement", nargs="+", default=["none", "greedy"], choices=PLACEMENTS)
    g.add_argument("--calib_steps", type=int, help="warmup batches the placement is planned from "
                                                   "(default: all warmup batches)")
    g.add_argument("--load_steps", type=int, default=4, help="timed batches the expert load is measured on")
    g.add_argument("--optimizer", default="adafactor", choices=("adafactor", "adamw"))
    g.add_argument("--learning_rate", type=float, default=1e-3)
    g.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="folder for results.json and results.md (default: "
                                  "benchmark-results/mesh-<date-time>)")
    from pregated_jax.bench.mesh_infer import add_infer_flags

    add_infer_flags(ap)
    return ap


def check_args(ap: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    for name in ("cpu_devices", "num_experts", "per_device_batch", "global_batch", "input_len", "target_len",
                 "steps", "repeats", "calib_steps", "load_steps"):
        value = getattr(a, name)
        if value is not None and value < 1:
            ap.error(f"--{name} must be >= 1, got {value}")
    if a.warmup < 1:
        ap.error(f"--warmup must be >= 1 (the first step compiles), got {a.warmup}")
    if a.devices and min(a.devices) < 1:
        ap.error(f"--devices must be positive, got {a.devices}")
    if a.calib_steps is not None and a.calib_steps > a.warmup:
        ap.error(f"--calib_steps {a.calib_steps} exceeds --warmup {a.warmup}: the placement is planned from "
                 f"warmup batches")
    if a.skew < 0:
        ap.error(f"--skew must be >= 0, got {a.skew}")
    if a.dropout_rate is not None and not 0 <= a.dropout_rate < 1:
        ap.error(f"--dropout_rate must be in [0, 1), got {a.dropout_rate}")
    a.placement = list(dict.fromkeys(a.placement))  # unique, in the order given


def configure_devices(cpu_devices: int | None) -> None:
    """N fake CPU devices: must run before JAX initialises its backends (no device query before it)."""
    if cpu_devices is None:
        return
    os.environ["JAX_PLATFORMS"] = "cpu"
    flags = os.environ.get("XLA_FLAGS", "")
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", flags)
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={cpu_devices} " \
                              f"{PATIENT_COLLECTIVES}".strip()
    import jax

    jax.config.update("jax_platforms", "cpu")
    got = len(jax.devices())
    if got != cpu_devices:
        raise RuntimeError(f"--cpu_devices {cpu_devices}: JAX sees {got} devices (its backend was initialised "
                           f"before the flag could apply)")


# --- model, batches, placement -----------------------------------------------------------------------------

def model_config(a: argparse.Namespace):
    from pregated_jax.config import get_preset

    overrides = {"routing": a.routing}
    for name in ("num_experts", "dtype", "dropout_rate"):
        if getattr(a, name) is not None:
            overrides[name] = getattr(a, name)
    return get_preset(a.preset, **overrides)


def skew_routers(model, skew: float, seed: int) -> None:
    """Scales each router's (and pre-gate's) classifier column of the expert of rank r by 1 / (r + 1)^skew,
    ranks in a random order per router, so routing is skewed as in a trained model (in place)."""
    from pregated_jax.routing import Router

    if skew == 0:
        return
    rng = np.random.default_rng(seed)
    for _, module in model.iter_modules():
        if isinstance(module, Router):
            w = module.classifier.get_value()  # [d, E]
            rank = rng.permutation(w.shape[1])  # [E] rank of each expert
            scale = (1.0 / (rank + 1.0) ** skew).astype(np.float32)  # [E]
            module.classifier.set_value(w * scale[None, :].astype(w.dtype))


def synthetic_batch(cfg, batch: int, input_len: int, target_len: int, seed: int, step: int) -> dict:
    """Step `step`'s batch: uniform random tokens (ids 2 .. vocab-1, so no pad or EOS), no padding.
    Depends only on (seed, step, shapes): every mesh with the same global batch sees the same data."""
    rng = np.random.default_rng([seed, step])
    ids = lambda n: rng.integers(2, cfg.vocab_size, (batch, n), dtype=np.int32)  # noqa: E731
    labels = ids(target_len)  # [B, T]
    decoder_input_ids = np.concatenate(
        [np.full((batch, 1), cfg.decoder_start_token_id, np.int32), labels[:, :-1]], axis=1)  # [B, T]
    return {"input_ids": ids(input_len), "attention_mask": np.ones((batch, input_len), np.int32),
            "decoder_input_ids": decoder_input_ids, "labels": labels,
            "decoder_attention_mask": np.ones((batch, target_len), np.int32)}


def per_device_load(trace, placement: dict, ep: int) -> dict:
    """Tokens per position of the `expert` axis, per MoE block, from a routing trace of logical experts and
    the model's placement (block -> perm [E]). A block's imbalance is max / mean over the positions; overall
    is sum_b max_b / sum_b mean_b (each block waits for its busiest device), as `balance_report`.
    lower_bound: what no placement of E / ep experts per device beats on these counts
    (`placement_lower_bound`; overall, weighted by the blocks' means)."""
    from pregated_jax.expert_placement import device_loads, placement_lower_bound

    blocks, tot_max, tot_mean, tot_bound = {}, 0.0, 0.0, 0.0
    for b, counts in trace.counts.items():
        loads = device_loads(counts, placement[b], ep)  # [ep] tokens per expert-axis position
        mean = float(loads.mean())
        bound = placement_lower_bound(counts, ep)
        blocks[b] = {"devices": [int(x) for x in loads], "experts": [int(x) for x in counts],
                     "max_over_mean": float(loads.max()) / mean if mean else 1.0, "lower_bound": bound}
        tot_max, tot_mean, tot_bound = tot_max + float(loads.max()), tot_mean + mean, tot_bound + bound * mean
    return {"steps": trace.steps, "expert_devices": ep, "blocks": blocks,
            "max_over_mean": tot_max / tot_mean if tot_mean else 1.0,
            "lower_bound": tot_bound / tot_mean if tot_mean else 1.0}


# --- the training sweep ------------------------------------------------------------------------------------

def mesh_shapes(a: argparse.Namespace, num_devices: int) -> list[tuple[int, int]]:
    """The (data, expert) shapes to run, unique, in order; raises naming a shape larger than the devices."""
    if a.meshes:
        shapes = a.meshes
    elif a.devices:
        shapes = [(1, n) for n in a.devices]
    else:
        shapes = [(1, 1 << k) for k in range(num_devices.bit_length()) if 1 << k <= num_devices]
    for d, e in shapes:
        if d * e > num_devices:
            raise ValueError(f"mesh {d}x{e} needs {d * e} devices; {num_devices} are available "
                             f"(on the CPU, give --cpu_devices N)")
    return list(dict.fromkeys(shapes))


def global_batch(a: argparse.Namespace, shape: tuple[int, int]) -> int:
    """--global_batch (strong scaling), else --per_device_batch x the mesh's devices (weak scaling)."""
    return a.global_batch or a.per_device_batch * shape[0] * shape[1]


def check_shapes(a: argparse.Namespace, cfg, shapes: list[tuple[int, int]]) -> None:
    """Refuses, before anything runs, a shape whose expert axis does not divide E or whose device count does
    not divide the global batch."""
    for d, e in shapes:
        if cfg.num_experts % e:
            raise ValueError(f"mesh {d}x{e}: {cfg.num_experts} experts do not split over expert={e}")
        batch = global_batch(a, (d, e))
        if batch % (d * e):
            raise ValueError(f"mesh {d}x{e}: global batch {batch} does not divide over its {d * e} devices")


def train_row(a, cfg, shape: tuple[int, int], method: str, log) -> dict:
    """One mesh shape and placement method: compile, warm up, time, measure the expert load."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from pregated_jax.expert_parallel import batch_sharding, replicated, shard_model
    from pregated_jax.expert_placement import apply_placement, get_placement, plan_placement, record_routing
    from pregated_jax.mesh import make_mesh
    from pregated_jax.model import SwitchTransformer
    from pregated_jax.train.config import OptimizerConfig
    from pregated_jax.train.loop import RngCodec, TrainState, init_opt_state, make_train_step
    from pregated_jax.train.optim import make_optimizer

    data, expert = shape
    n = data * expert
    batch = global_batch(a, shape)
    mesh = make_mesh(data, expert)
    sharding = batch_sharding(mesh)
    total_steps = a.warmup + a.repeats * a.steps
    host = [synthetic_batch(cfg, batch, a.input_len, a.target_len, a.seed, s) for s in range(total_steps)]
    put = lambda b: jax.device_put(b, sharding)  # noqa: E731

    model = SwitchTransformer(cfg, rngs=nnx.Rngs(a.seed))
    skew_routers(model, a.skew, a.seed)
    model = shard_model(model, mesh, a.collective)
    plan_s = 0.0
    if method != "none":  # plan from the first warmup batches' routing, place before the state is built
        t0 = time.perf_counter()
        model.eval()
        trace = record_routing(model, [put(b) for b in host[:a.calib_steps or a.warmup]])
        apply_placement(model, plan_placement(trace, expert, method))
        plan_s = time.perf_counter() - t0
    placement = get_placement(model)

    model.train()
    train_def, params, rngs = nnx.split(model, nnx.Param, nnx.RngState)
    model.eval()
    eval_def, _, _ = nnx.split(model, nnx.Param, nnx.RngState)
    del model  # its buffers belong to the train state from here (donated every step)
    params = jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                          nnx.to_pure_dict(params))  # float32 master weights, as train_and_evaluate
    rngs = nnx.to_pure_dict(rngs)
    codec = RngCodec(rngs)
    opt = OptimizerConfig(name=a.optimizer, learning_rate=a.learning_rate)
    tx, schedule = make_optimizer(opt, total_steps)
    train_step = make_train_step(train_def, cfg, tx, schedule, codec)
    step = jax.device_put(jnp.zeros((), jnp.int32), replicated(mesh))
    state = TrainState(step, params, init_opt_state(tx, params, mesh), codec.encode(rngs))

    losses, warmup_s = [], []
    for s in range(a.warmup):
        t0 = time.perf_counter()
        state, metrics = train_step(state, put(host[s]))
        losses.append(float(metrics["loss"]))  # syncs
        warmup_s.append(time.perf_counter() - t0)
    window_s = []
    for r in range(a.repeats):
        first = a.warmup + r * a.steps
        on_device = [put(b) for b in host[first:first + a.steps]]
        jax.block_until_ready(on_device)
        window_losses = []
        t0 = time.perf_counter()
        for b in on_device:
            state, metrics = train_step(state, b)
            window_losses.append(metrics["loss"])
        jax.block_until_ready(state)
        window_s.append(time.perf_counter() - t0)
        losses += [float(x) for x in window_losses]
    if not np.all(np.isfinite(losses)):
        raise FloatingPointError(f"mesh {data}x{expert}, placement {method}: non-finite loss {losses}")

    load_model = nnx.merge(eval_def, state.params, codec.decode(state.rngs))
    timed = host[a.warmup:a.warmup + min(a.load_steps, a.repeats * a.steps)]
    load = per_device_load(record_routing(load_model, [put(b) for b in timed]), placement, expert)
    del load_model, state

    best = min(window_s)
    steps_per_s = a.steps / best
    tokens = batch * (a.input_len + a.target_len)  # encoder + decoder positions per step
    row = {"mesh": f"{data}x{expert}", "data": data, "expert": expert, "devices": n, "placement": method,
           "global_batch": batch, "per_device_batch": batch // n, "tokens_per_step": tokens,
           "steps_per_s": steps_per_s, "steps_per_s_median": a.steps / float(np.median(window_s)),
           "tokens_per_s": steps_per_s * tokens,
           "tokens_per_s_per_device": steps_per_s * tokens / n, "first_loss": losses[0],
           "load": load, "placement_perm": {b: [int(x) for x in p] for b, p in placement.items()},
           "raw": {"warmup_step_s": warmup_s, "window_s": window_s, "steps_per_window": a.steps,
                   "plan_s": plan_s, "losses": losses}}
    log(f"  {row['mesh']:>5} {method:<14} {steps_per_s:8.3f} steps/s  {row['tokens_per_s']:10.1f} tok/s  "
        f"load max/mean {load['max_over_mean']:.3f}  first loss {losses[0]:.6f}  "
        f"(compile+first step {warmup_s[0]:.1f} s)")
    return row


def add_efficiency(rows: list[dict]) -> dict | None:
    """Each measured row's tokens/s per device over the reference row's (fewest devices, placement none;
    else the first measured row); returns the reference's mesh and placement. Failed rows are skipped."""
    done = [r for r in rows if "error" not in r]
    if not done:
        return None
    fewest = min(r["devices"] for r in done)
    ref = next((r for r in done if r["devices"] == fewest and r["placement"] == "none"), done[0])
    for r in done:
        r["scaling_efficiency"] = r["tokens_per_s_per_device"] / ref["tokens_per_s_per_device"]
    return {"mesh": ref["mesh"], "placement": ref["placement"]}


def train_sweep(a: argparse.Namespace, log=print, on_row=None) -> dict:
    """Every mesh shape x placement method (placements only where expert >= 2: one expert device holds
    every expert). -> {"config": ..., "rows": [...], "reference": ...}. A row that raises (e.g. out of
    memory) is kept as {"mesh", "devices", "placement", "error"} and the sweep goes on. `on_row(result)`
    is called with the result so far after each row (to save partial results)."""
    import jax

    if jax.process_count() > 1:
        raise ValueError(f"the mesh benchmark runs in one process; this is one of {jax.process_count()}")
    cfg = model_config(a)
    if not a.global_batch and not a.per_device_batch:
        a.per_device_batch = 2
    shapes = mesh_shapes(a, len(jax.devices()))
    check_shapes(a, cfg, shapes)
    jobs = [(s, m) for s in shapes for m in a.placement if m == "none" or s[1] > 1]
    per = f"global batch {a.global_batch}" if a.global_batch else f"per-device batch {a.per_device_batch}"
    log(f"train sweep: preset {a.preset} ({cfg.num_experts} experts, {cfg.routing}), {per}, "
        f"lengths {a.input_len}+{a.target_len}, {len(jobs)} rows")
    config = {"model": dataclasses.asdict(cfg), "preset": a.preset, "skew": a.skew,
              "scaling": "strong" if a.global_batch else "weak", "per_device_batch": a.per_device_batch,
              "global_batch": a.global_batch, "input_len": a.input_len, "target_len": a.target_len,
              "warmup": a.warmup, "steps": a.steps, "repeats": a.repeats, "placement": a.placement,
              "calib_steps": a.calib_steps or a.warmup, "load_steps": min(a.load_steps, a.repeats * a.steps),
              "optimizer": a.optimizer, "learning_rate": a.learning_rate, "collective": a.collective, "seed": a.seed,
              "data": "synthetic: uniform random token ids, no padding, one batch per step from the seed"}
    result = {"config": config, "rows": [], "reference": None}
    for i, ((data, expert), method) in enumerate(jobs):
        log(f"[{i + 1}/{len(jobs)}] mesh {data}x{expert}, placement {method} ...")
        try:
            row = train_row(a, cfg, (data, expert), method, log)
        except Exception as e:  # noqa: BLE001  (one failed shape, e.g. out of memory, keeps the others)
            row = {"mesh": f"{data}x{expert}", "data": data, "expert": expert, "devices": data * expert,
                   "placement": method, "error": f"{type(e).__name__}: {e}"[:4000]}
            log(f"  {row['mesh']:>5} {method:<14} FAILED: {row['error'][:500]}")
        result["rows"].append(row)
        result["reference"] = add_efficiency(result["rows"])
        if on_row is not None:
            on_row(result)
    return result


# --- report ------------------------------------------------------------------------------------------------

def machine_info() -> dict:
    import jax

    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    return {"platform": devices[0].platform, "device_kinds": kinds, "device_count": len(devices),
            "process_count": jax.process_count(), "jax": jax.__version__, "python": platform.python_version(),
            "host": platform.node(), "cpu_count": os.cpu_count(),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


def train_table(result: dict) -> str:
    rows = ["| mesh | devices | placement | global batch | steps/s | tokens/s | tokens/s/device | efficiency "
            "| load max/mean | bound | first loss |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        if "error" in r:
            rows.append(f"| {r['mesh']} | {r['devices']} | {r['placement']} | failed: "
                        f"{r['error'].splitlines()[0][:120]} |" + " |" * 7)
            continue
        rows.append(f"| {r['mesh']} | {r['devices']} | {r['placement']} | {r['global_batch']} | "
                    f"{r['steps_per_s']:.3f} | {r['tokens_per_s']:.1f} | {r['tokens_per_s_per_device']:.1f} | "
                    f"{r['scaling_efficiency']:.3f} | {r['load']['max_over_mean']:.3f} | "
                    f"{r['load']['lower_bound']:.3f} | {r['first_loss']:.6f} |")
    return "\n".join(rows)


def load_table(result: dict) -> str:
    """Tokens per expert-axis position, per MoE block, of each row (over the measured batches)."""
    rows = ["| mesh | placement | block | tokens per expert-axis device | max/mean | bound |",
            "| --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        for b, x in r.get("load", {}).get("blocks", {}).items():
            rows.append(f"| {r['mesh']} | {r['placement']} | {b} | {' '.join(map(str, x['devices']))} | "
                        f"{x['max_over_mean']:.3f} | {x['lower_bound']:.3f} |")
    return "\n".join(rows)


def markdown(report: dict) -> str:
    m = report["machine"]
    out = [f"# Mesh benchmark, {report['date']}", "",
           f"Machine: {m['device_count']} x {', '.join(m['device_kinds'])} ({m['platform']}), jax {m['jax']}, "
           f"host {m['host']} ({m['cpu_count']} CPUs).", "", f"Command: `{report['command']}`", ""]
    if "train" in report:
        t = report["train"]
        c, ref = t["config"], t["reference"] or {"mesh": "-", "placement": "-"}
        out += ["## Training", "",
                f"{c['scaling']} scaling, preset {c['preset']} ({c['model']['num_experts']} experts, "
                f"{c['model']['routing']}, {c['model']['dtype']}), lengths {c['input_len']}+{c['target_len']}, "
                f"skew {c['skew']}, {c['warmup']} warmup + best of {c['repeats']} x {c['steps']} timed steps. "
                f"Efficiency: tokens/s per device over row {ref['mesh']} ({ref['placement']}). Load: max/mean "
                f"tokens per expert-axis device (the sum of the MoE blocks' maxima over the sum of their means) "
                f"over the first {c['load_steps']} timed batches; bound: what no placement beats on those "
                f"counts.", "", train_table(t), "",
                "Tokens per expert-axis device, per MoE block:", "", load_table(t), ""]
    if "infer" in report:
        from pregated_jax.bench.mesh_infer import infer_table

        c = report["infer"]["config"]
        out += ["## Inference", "",
                f"{c['scaling']} scaling, preset {c['preset']} ({c['model']['num_experts']} experts, "
                f"{c['model']['routing']}, {c['model']['dtype']}), {c['input_len']} input tokens, "
                f"{c['new_tokens']} new tokens, skew {c['skew']}, best of {c['repeats']} runs after a compiling "
                f"one. Efficiency: decode tokens/s per device over the same mode's fewest-devices unplaced row. "
                f"Load: max/mean tokens per expert-axis device over the request (the sum of the MoE blocks' "
                f"maxima over the sum of their means).", "", infer_table(report["infer"]), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    check_args(ap, a)
    configure_devices(a.cpu_devices)  # before anything queries the devices
    import jax

    if jax.devices()[0].platform == "cpu":  # full float32 matmuls: the same losses on every mesh shape
        jax.config.update("jax_default_matmul_precision", "highest")
    log = lambda text: print(text, flush=True)  # noqa: E731
    now = datetime.datetime.now(datetime.timezone.utc)
    out = Path(a.out or f"benchmark-results/mesh-{now:%Y%m%d-%H%M%S}")
    report = {"date": now.isoformat(timespec="seconds"), "machine": machine_info(),
              "command": shlex.join(["python", sys.argv[0] if argv is None else "scripts/mesh_benchmark.py",
                                     *(sys.argv[1:] if argv is None else argv)]),
              "argv": sys.argv[1:] if argv is None else list(argv)}
    log(f"devices: {report['machine']['device_count']} x {', '.join(report['machine']['device_kinds'])}")
    try:  # refuse a bad shape before any row runs
        if not a.global_batch and not a.per_device_batch:
            a.per_device_batch = 2
        check_shapes(a, model_config(a), mesh_shapes(a, len(jax.devices())))
    except (KeyError, ValueError) as e:
        ap.error(e.args[0] if isinstance(e, KeyError) else str(e))
    out.mkdir(parents=True, exist_ok=True)

    def save(name: str, result: dict) -> None:  # after every row: a crash keeps the rows measured so far
        report[name] = result
        (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / "results.md").write_text(markdown(report))

    if "train" in a.sweeps:
        save("train", train_sweep(a, log, on_row=lambda result: save("train", result)))
        print(train_table(report["train"]))
    if "infer" in a.sweeps:
        from pregated_jax.bench.mesh_infer import infer_sweep, infer_table, public

        save("infer", public(infer_sweep(a, log, on_row=lambda result: save("infer", public(result)))))
        print(infer_table(report["infer"]))
    log(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    failed = [f"{name} {r['mesh']} {r['placement']}" for name in SWEEPS
              for r in report.get(name, {}).get("rows", []) if "error" in r]
    if failed:
        log(f"failed rows: {', '.join(failed)}")
    return 1 if failed else 0
