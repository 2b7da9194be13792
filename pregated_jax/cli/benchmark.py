"""Benchmark: engine modes x presets x batch x beams, and the Hugging Face peer, in one run.

Runs as `pregated-benchmark`, `python -m pregated_jax.benchmark` or `python scripts/benchmark.py`.

    python scripts/benchmark.py                       # the full GPU sweep (see --help), ~20 minutes on an H100
    python scripts/benchmark.py --tiny --out /tmp/b   # the CPU smoke configuration (the tests run it)
    python scripts/benchmark.py --merge RUN1 RUN2 ... --out SWEEP   # one report from several runs' folders
    python scripts/benchmark.py --expert_dtypes bfloat16 int8 float8_e4m3fn int4   # expert formats as an axis

Every (preset, implementation, mode) runs in its own worker process, so each gets its own device memory
peak; an engine worker receives its `EngineConfig` as JSON (`pregated_jax.engine_cli.to_json`). Workers print
one JSON line per (batch, beams) row. Random bf16 weights at the real shapes. The engine flags are
`EngineConfig`'s fields, as in scripts/infer.py, but for the mode (--modes sweeps it) and with
--stop_when_finished off by default (every run does the same work); a cache applies to the modes that copy
routed experts, a device budget to pregated mode only.
Writes `results.json` (rows, machine, command), `results.md` (table, roofline ratios) and `chart.png` into
--out (default: benchmark-results/<date-time> under the current directory).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pregated_jax.cli import HelpFormatter


FULL = dict(presets=["switch-base-8", "switch-base-64", "switch-base-128", "switch-base-256", "switch-large-128"],
            modes=["gpu-only", "on-demand", "prefetch-all", "pregated", "speculative"],
            peer_modes=["gpu-only", "on-demand"], batches=[1, 8], beams=[1, 4], input_len=256, new_tokens=64)
TINY = dict(presets=["tiny"], modes=["gpu-only", "on-demand", "prefetch-all", "pregated", "speculative"],
            peer_modes=["gpu-only", "on-demand"], batches=[1, 2], beams=[1, 2], input_len=16, new_tokens=4)
LINK_GBPS = 52.0  # pinned host->device bandwidth of the H100 machine's PCIe Gen5 link, measured with 1 GB copies
RESULTS_VERSION = 2  # results.json's "version"; `read_results` upgrades every earlier one


def parse_args(argv=None):
    from pregated_jax.engine_cli import add_engine_flags, add_mesh_flag, add_process_flags

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the CPU smoke configuration")
    p.add_argument("--presets", nargs="+")
    p.add_argument("--modes", nargs="+")
    p.add_argument("--expert_dtypes", nargs="+", metavar="DTYPE",
                   help="expert formats to sweep (bfloat16 int8 float8_e4m3fn int4; default: --expert_dtype); each "
                        "format's rows take their roofline from gpu-only at that format")
    p.add_argument("--peer_modes", nargs="*", help="HF peer modes (empty: no peer)")
    p.add_argument("--batches", nargs="+", type=int)
    p.add_argument("--beams", nargs="+", type=int)
    p.add_argument("--input_len", type=int)
    p.add_argument("--new_tokens", type=int)
    p.add_argument("--repeats", type=int, default=2,
                   help="timed runs per row (the best is reported; results.json keeps every run's rates)")
    p.add_argument("--profile_all_rows", action="store_true",
                   help="per-MoE-block latency for every row (default: the first row of each worker only; "
                   "the profiled run dispatches block by block and compiles its own functions)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per worker")
    p.add_argument("--out", help="the report's folder (default: benchmark-results/<date-time>; --plot_only and "
                   "--merge need it)")
    p.add_argument("--plot_only", action="store_true", help="redraw results.md/chart.png from results.json")
    p.add_argument("--merge", nargs="+", metavar="RUN",
                   help="write one report into --out from these runs' folders (each with a results.json); a later "
                   "run's row replaces an earlier one's for the same preset, implementation, mode, batch and beams")
    p.add_argument("--worker", choices=["engine", "peer"], help=argparse.SUPPRESS)
    p.add_argument("--preset", help=argparse.SUPPRESS)
    p.add_argument("--peer_mode", help=argparse.SUPPRESS)
    p.add_argument("--engine_config", help=argparse.SUPPRESS)  # an engine worker's EngineConfig, as JSON
    add_process_flags(p)
    add_mesh_flag(p)
    add_engine_flags(p, exclude=("mode",), stop_when_finished=False)
    args = p.parse_args(argv)
    if (args.plot_only or args.merge) and args.out is None:
        p.error("--plot_only and --merge need --out")
    from pregated_jax.mesh import parse_mesh
    try:
        parse_mesh(args.mesh)  # a malformed --mesh fails here, before any worker starts
    except ValueError as e:
        p.error(str(e))
    base = TINY if args.tiny else FULL
    for k, v in base.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    from pregated_jax.quant import FORMATS
    args.expert_dtypes = args.expert_dtypes or [args.expert_dtype]
    unknown = [d for d in args.expert_dtypes if d not in FORMATS]
    if unknown:
        p.error(f"--expert_dtypes: unknown format(s) {unknown}; choose from {', '.join(FORMATS)}")
    return args


def worker_config(args, mode: str, expert_dtype: str | None = None):
    """The engine flags' `EngineConfig` for one mode's worker (experts in `expert_dtype`, default the flag's):
    the cache only in the modes that copy routed experts (gpu-only and prefetch-all keep whole blocks
    resident), the device budget only in pregated mode."""
    from pregated_jax.engine_cli import engine_config_from_args

    cached = mode not in ("gpu-only", "prefetch-all")
    return engine_config_from_args(args, mode=mode, expert_dtype=expert_dtype or args.expert_dtype,
                                   cache_policy=args.cache_policy if cached else None,
                                   cache_experts=args.cache_experts if cached else None,
                                   device_budget_bytes=args.device_budget_bytes if mode == "pregated" else None)


# --- workers ------------------------------------------------------------------------------------------

def engine_worker(args):
    import jax
    import numpy as np

    from pregated_jax.bench.random_model import random_model
    from pregated_jax.config import get_preset
    from pregated_jax.engine import InferenceEngine
    from pregated_jax.engine_cli import GIB, flag_text, from_json, mesh_from_args

    config = from_json(args.engine_config)
    routing = "conventional" if config.mode == "speculative" else "pregated"
    dtype = "float32" if args.tiny else "bfloat16"
    cfg = get_preset(args.preset, routing=routing, dtype=dtype)
    t0 = time.perf_counter()
    on_host = config.mode != "gpu-only"  # gpu-only: the engine quantizes the stacks on the device
    model = random_model(cfg, seed=0, experts_on_host=on_host, group_size=config.expert_group_size,
                         expert_dtype=config.expert_dtype if on_host else "bfloat16")
    mesh = mesh_from_args(args)
    engine = InferenceEngine(model, config, mesh=mesh)
    del model
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    for batch in args.batches:
        for beams in args.beams:
            ids = rng.integers(2, min(cfg.vocab_size, 32000), (batch, args.input_len), dtype=np.int32)
            t = time.perf_counter()
            engine.generate(ids, max_new_tokens=args.new_tokens, num_beams=beams)  # compile + warm up
            compile_s = time.perf_counter() - t
            runs = [engine.generate(ids, max_new_tokens=args.new_tokens, num_beams=beams).stats
                    for _ in range(args.repeats)]
            every = [s.as_dict() for s in runs]  # the spread between runs is kept beside the best one
            best = dict(min(every, key=lambda d: d["prefill_s"] + d["decode_s"]))
            best.update(decode_tokens_per_s_runs=[d["decode_tokens_per_s"] for d in every],
                        decode_s_runs=[d["decode_s"] for d in every],
                        end_to_end_tokens_per_s_runs=[d["end_to_end_tokens_per_s"] for d in every])
            # Memory and per-MoE-block latency in separate runs: sampling and syncing perturb timing. Both
            # synchronize block by block, which a mesh's single-dispatch prefill and decode steps do not.
            mem_stats = None if mesh is not None else engine.generate(
                ids, max_new_tokens=args.new_tokens, num_beams=beams, track_memory=True).stats
            first_row = (batch, beams) == (args.batches[0], args.beams[0])
            moe_block_ms = (engine.generate(ids, max_new_tokens=args.new_tokens, num_beams=beams,
                                            profile_blocks=True).stats.as_dict()["moe_block_ms"]
                            if (args.profile_all_rows or first_row) and mesh is None else None)
            best.update(preset=args.preset, impl="pregated-jax",
                        sampled_peak_bytes=mem_stats and mem_stats.sampled_peak_bytes,
                        mesh=None if mesh is None else dict(mesh.shape), devices=1 if mesh is None else mesh.size,
                        moe_block_ms=moe_block_ms, compile_s=compile_s, build_s=build_s,
                        device=str(jax.devices()[0].device_kind), engine_config=dataclasses.asdict(config),
                        expert_dtype=config.expert_dtype,  # the sweep's format axis (stats name the stacks' dtype)
                        cache=config.cache_policy, decode_steps_per_call=config.decode_steps_per_call,
                        prefill_copy="routed" if config.prefill_routed_only else "whole",
                        guess_first_block=flag_text("guess_first_block", config.guess_first_block),
                        copy_method=engine.copy_method, miss_copy_method=engine.miss_copy_method,
                        dma_wait="kernel" if engine.copy_method == "dma" else None,
                        xla_flags=os.environ.get("XLA_FLAGS"), cuda_module_loading=os.environ.get("CUDA_MODULE_LOADING"),
                        device_budget_gib=config.device_budget_bytes / GIB if config.device_budget_bytes else None)
            print("ROW " + json.dumps(best), flush=True)


def peer_worker(args):
    from pregated_jax.bench.hf_peer import run_hf_peer
    from pregated_jax.config import get_preset

    cfg = get_preset(args.preset).to_hf_dict()
    cfg.pop("pregated_jax")
    device = "cpu" if args.tiny else "cuda"
    for batch in args.batches:
        for beams in args.beams:
            r = run_hf_peer(cfg, args.peer_mode, batch, beams, input_len=args.input_len, new_tokens=args.new_tokens,
                            device=device, seed=0)
            r.pop("tokens", None)
            r.update(preset=args.preset, impl="hf-transformers", mode=args.peer_mode, batch=batch, num_beams=beams)
            print("ROW " + json.dumps(r), flush=True)


# --- orchestration ------------------------------------------------------------------------------------

def spawn(args, preset: str, mode: str, engine_config=None) -> list[dict]:
    """Runs one worker: the engine with `engine_config` (an `EngineConfig`), or, without one, the HF peer in
    `mode` -> its rows, or one row naming the error."""
    from pregated_jax.engine_cli import to_json

    worker = "peer" if engine_config is None else "engine"
    cmd = [sys.executable, "-m", "pregated_jax.benchmark", "--worker", worker, "--preset", preset,
           "--batches", *map(str, args.batches), "--beams", *map(str, args.beams),
           "--input_len", str(args.input_len), "--new_tokens", str(args.new_tokens), "--repeats", str(args.repeats)] + \
          (["--tiny"] if args.tiny else []) + (["--profile_all_rows"] if args.profile_all_rows else []) + \
          (["--mesh", args.mesh] if args.mesh and engine_config is not None else []) + \
          (["--peer_mode", mode] if engine_config is None else ["--engine_config", to_json(engine_config)])
    t = time.perf_counter()
    env = dict(os.environ)
    # The worker imports this package from where this process did (a source checkout need not be installed).
    package_parent = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([package_parent] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/pregated_jax_compile_cache")
    # Workers of one preset share most functions (the prefill's block functions): cache them all.
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
        out, err, code = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out, err, code = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout", -1
    rows = [json.loads(line[4:]) for line in out.splitlines() if line.startswith("ROW ")]
    status = "ok" if code == 0 else f"FAILED ({code})"
    dtype = "" if engine_config is None else engine_config.expert_dtype
    print(f"[{time.perf_counter() - t:6.1f}s] {worker:6s} {preset:16s} {mode:13s} {dtype:13s} {len(rows)} rows {status}",
          flush=True)
    if code != 0:
        rows.append(dict(preset=preset, mode=mode, impl="pregated-jax" if worker == "engine" else "hf-transformers",
                         error=err.strip().splitlines()[-1][:300] if err.strip() else f"exit {code}",
                         **({} if engine_config is None else dict(expert_dtype=engine_config.expert_dtype))))
    return rows


def machine_info() -> dict:
    info = dict(python=platform.python_version(), host=platform.node(), platform=platform.platform())
    try:
        import jax
        info.update(jax=jax.__version__, device=str(jax.devices()[0].device_kind), backend=jax.default_backend())
    except Exception as e:  # noqa: BLE001
        info["jax_error"] = str(e)
    try:
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                             "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    except FileNotFoundError:
        pass
    return info


def add_ratios(rows: list[dict]) -> None:
    """Per row: decode time over its roofline max(gpu-only decode time, decode bytes that must move / link
    bandwidth; guesses' wasted copies do not count),
    and end-to-end speed over the HF OnDemand peer's."""
    key = lambda r: (r.get("preset"), r.get("batch"), r.get("num_beams"))  # noqa: E731
    fmt = lambda r: r.get("expert_dtype", "bfloat16")  # noqa: E731  (older results: bfloat16)
    gpu = {key(r) + (fmt(r),): r for r in rows
           if r.get("impl") == "pregated-jax" and r.get("mode") == "gpu-only" and "error" not in r}
    peer = {key(r): r for r in rows if r.get("impl") == "hf-transformers" and r.get("mode") == "on-demand"
            and "error" not in r}
    for r in rows:
        if r.get("impl") != "pregated-jax" or "error" in r:
            continue
        if r.get("prefill_s"):
            r["prefill_gb_per_s"] = r["prefill_experts_copied"] * r["expert_bytes"] / r["prefill_s"] / 1e9
        g = gpu.get(key(r) + (fmt(r),))  # gpu-only at the row's expert format
        if g:
            roof = max(g["decode_s"], r["decode_bytes_needed"] / (LINK_GBPS * 1e9))
            r["roofline_decode_s"] = roof
            r["decode_over_roofline"] = r["decode_s"] / roof
            if r.get("decode_s_runs"):  # every timed run's ratio, where the row kept every run
                r["decode_over_roofline_runs"] = [d / roof for d in r["decode_s_runs"]]
            if g.get("peak_device_bytes") and r.get("peak_device_bytes"):
                r["peak_vs_gpu_only"] = r["peak_device_bytes"] / g["peak_device_bytes"]
        p = peer.get(key(r))
        if p and p.get("tokens_per_s"):
            r["speedup_vs_hf_on_demand"] = r["end_to_end_tokens_per_s"] / p["tokens_per_s"]


def write_report(out: Path, doc: dict) -> None:
    rows = doc["rows"]
    add_ratios(rows)
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    merged = "sources" in doc
    lines = [f"# Benchmark results\n", f"Machine: `{doc['machine'].get('nvidia_smi') or doc['machine'].get('device')}`, "
             f"jax {doc['machine'].get('jax')}. Command: `{doc['command']}`. "
             f"{doc['input_len']} input tokens, {doc['new_tokens']} new tokens, random bf16 weights. Our rows are "
             f"the best of the timed runs"
             + ("; results.json has every run's rates (`*_runs`).\n"
                if any("decode_tokens_per_s_runs" in r for r in rows) else ".\n")]
    if merged:  # each row names its run; ratios pair rows of the merged table (same preset, batch, beams)
        lines += ["Merged from these runs (column `run`); each run's folder holds its own command and raw rows:", ""]
        lines += [f"- [{s['folder']}]({s['folder']}/results.md), started {s['started']}: `{s['command']}`"
                  for s in doc["sources"]]
        lines.append("")
    lines += ["| preset | impl | mode | batch | beams | prefill ms | decode tok/s | end-to-end tok/s | x HF OnDemand "
              "| decode / roofline | MoE block ms | GB moved | prefill H2D GB/s | peak GiB | peak vs gpu-only |"
              + (" run |" if merged else ""),
              "| --- " * (16 if merged else 15) + "|"]
    f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['preset']} | {r['impl']} | {r['mode']} | | | error: {r['error']} | | | | | | | | | |"
                         + (f" {r['source']} |" if merged else ""))
            continue
        ours = r["impl"] == "pregated-jax"
        peak = r.get("peak_device_bytes") if ours else r.get("peak_gpu_bytes")
        mode = r["mode"] + (f" ({r['device_budget_gib']} GiB budget)" if r.get("device_budget_gib") else "")
        mode += f", {r['expert_dtype']} experts" if r.get("expert_dtype", "bfloat16") != "bfloat16" else ""
        lines.append(
            f"| {r['preset']} | {r['impl']} | {mode} | {r['batch']} | {r['num_beams']} "
            f"| {f(1e3 * r['prefill_s'] if r.get('prefill_s') is not None else None, '.1f')} "
            f"| {f(r.get('decode_tokens_per_s'), '.1f')} "
            f"| {f(r.get('end_to_end_tokens_per_s') or r.get('tokens_per_s'), '.1f')} "
            f"| {f(r.get('speedup_vs_hf_on_demand'), '.2f')} | {f(r.get('decode_over_roofline'), '.2f')} "
            f"| {f(r.get('moe_block_ms'), '.2f')} | {f(r['bytes_moved'] / 1e9 if ours else None, '.2f')} "
            f"| {f(r.get('prefill_gb_per_s'), '.1f')} | {f(peak / 2**30 if peak else None, '.2f')} "
            f"| {f(r.get('peak_vs_gpu_only'), '.3f')} |" + (f" {r['source']} |" if merged else ""))
    spread = [r for r in rows if r.get("decode_over_roofline_runs")]
    if spread:
        lines += ["", "Decode / roofline of every timed run (the table's row is the run with the best end-to-end "
                  "time; the host->device link's speed varies between runs on a shared machine):", ""]
        lines += [f"- {r['preset']} {r['mode']} ({r.get('expert_dtype', 'bfloat16')}), batch {r['batch']} x {r['num_beams']}: "
                  + ", ".join(f"{x:.3f}" for x in r["decode_over_roofline_runs"])
                  + f" (median {statistics.median(r['decode_over_roofline_runs']):.3f})" for r in spread]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot(out, rows)


DERIVED = ("prefill_gb_per_s", "roofline_decode_s", "decode_over_roofline", "decode_over_roofline_runs",
           "peak_vs_gpu_only", "speedup_vs_hf_on_demand")  # add_ratios' fields, recomputed on a merged table


def read_results(path: Path) -> dict:
    """A results.json, upgraded to the current layout (`RESULTS_VERSION`): the one place that knows earlier ones.

    Version 1 (no "version" key): a row of ours may lack `decode_bytes_needed` (the decode bytes that had to
    move, without guesses' wasted copies); its best stand-in is the bytes moved. Its rows may also lack the
    per-run lists (`*_runs`): those runs kept only the best timed run, and the report shows what a row has.
    """
    doc = json.loads(path.read_text())
    if doc.get("version", 1) < 2:
        for r in doc["rows"]:
            if r.get("impl") == "pregated-jax" and "error" not in r:
                r.setdefault("decode_bytes_needed", r["decode_bytes_moved"])
    doc["version"] = RESULTS_VERSION
    return doc


def merge_runs(runs: list[Path], out: Path, command: str) -> dict:
    """One report's document from several runs' results.json.

    A later run's row replaces an earlier one's with the same (preset, impl, mode, batch, beams); a failed
    worker's row is dropped where some run has rows of that (preset, impl, mode). Rows are ordered by preset,
    implementation (ours first), mode, batch and beams, and each names its run (`source`, relative to `out`).
    """
    docs, by_key = [], {}
    for run in runs:
        path = Path(run) / "results.json"
        if not path.is_file():
            raise SystemExit(f"--merge: no results.json in {run}")
        doc = read_results(path)
        if docs and (doc["input_len"], doc["new_tokens"]) != (docs[0]["input_len"], docs[0]["new_tokens"]):
            raise SystemExit(f"--merge: {path} ran {doc['input_len']} input / {doc['new_tokens']} new tokens, "
                             f"{runs[0]} ran {docs[0]['input_len']} / {docs[0]['new_tokens']}")
        source = os.path.relpath(Path(run).resolve(), out.resolve())
        docs.append(dict(doc, folder=source))
        for row in doc["rows"]:
            row = {k: v for k, v in row.items() if k not in DERIVED}
            row["source"] = source
            by_key[(row["preset"], row["impl"], row["mode"], row.get("batch"), row.get("num_beams"))] = row
    ran = {k[:3] for k, r in by_key.items() if "error" not in r}
    rows = [r for k, r in by_key.items() if "error" not in r or k[:3] not in ran]
    presets = FULL["presets"] + TINY["presets"]
    modes = FULL["modes"]
    rank = lambda r: (presets.index(r["preset"]) if r["preset"] in presets else len(presets), r["preset"],  # noqa: E731
                      r["impl"] != "pregated-jax", modes.index(r["mode"]) if r["mode"] in modes else len(modes),
                      r.get("batch") or 0, r.get("num_beams") or 0)
    return dict(version=RESULTS_VERSION, command=command, machine=docs[0]["machine"], input_len=docs[0]["input_len"],
                new_tokens=docs[0]["new_tokens"], started=min(d["started"] for d in docs),
                sources=[dict(folder=d["folder"], command=d["command"], started=d["started"]) for d in docs],
                rows=sorted(rows, key=rank))


def plot(out: Path, rows: list[dict]) -> None:
    """chart.png: end-to-end tokens/s per preset and implementation/mode, one panel per (batch, beams)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart")
        return
    ok = [r for r in rows if "error" not in r and r.get("batch") is not None]
    panels = sorted({(r["batch"], r["num_beams"]) for r in ok})
    if not panels:
        return
    presets = list(dict.fromkeys(r["preset"] for r in ok))
    series = list(dict.fromkeys((r["impl"], r["mode"]) for r in ok))
    colors = {s: plt.get_cmap("tab10")(n % 10) for n, s in enumerate(series)}
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6, 2.2 * len(presets)) * len(panels) ** 0.8, 4.2),
                             squeeze=False)
    width = 0.8 / max(1, len(series))
    for ax, (batch, beams) in zip(axes[0], panels):
        sel = [r for r in ok if (r["batch"], r["num_beams"]) == (batch, beams)]
        for n, (impl, mode) in enumerate(series):
            ys = []
            for p in presets:
                m = [r for r in sel if r["preset"] == p and r["impl"] == impl and r["mode"] == mode]
                ys.append((m[0].get("end_to_end_tokens_per_s") or m[0].get("tokens_per_s") or 0) if m else 0)
            label = f"{'HF ' if impl != 'pregated-jax' else ''}{mode}"
            ax.bar([i + n * width for i in range(len(presets))], ys, width, label=label, color=colors[(impl, mode)],
                   hatch="//" if impl != "pregated-jax" else None)
        ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(presets))],
                      [p.replace("switch-", "") for p in presets])
        ax.set_yscale("log")
        ax.set_title(f"batch {batch}, {'greedy' if beams == 1 else f'{beams} beams'}")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("end-to-end tokens/s (log)")
    axes[0][-1].legend(fontsize=7, ncol=1, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle("pregated-jax engine modes vs the Hugging Face peer (hatched)")
    fig.tight_layout()
    fig.savefig(out / "chart.png", dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    if args.worker is None:  # before any JAX computation; the workers inherit the environment
        from pregated_jax.engine_cli import prepare_process
        prepare_process(args)
    if args.worker == "engine":
        return engine_worker(args)
    if args.worker == "peer":
        return peer_worker(args)
    out = Path(args.out or Path("benchmark-results") / time.strftime("%Y%m%d-%H%M%S"))
    if args.plot_only:
        if not (out / "results.json").is_file():
            raise SystemExit(f"--plot_only: no results.json in {out}")
        return write_report(out, read_results(out / "results.json"))
    command = "python scripts/benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.merge:
        doc = merge_runs([Path(m) for m in args.merge], out, command.strip())
        out.mkdir(parents=True, exist_ok=True)
        write_report(out, doc)
        return print((out / "results.md").read_text())
    try:  # flags the engine rejects fail before any worker runs
        configs = {(mode, dt): worker_config(args, mode, dt) for dt in args.expert_dtypes for mode in args.modes}
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    out.mkdir(parents=True, exist_ok=True)
    print(f"writing into {out}", flush=True)
    doc = dict(version=RESULTS_VERSION, command=command.strip(), machine=machine_info(), input_len=args.input_len,
               new_tokens=args.new_tokens, started=time.strftime("%Y-%m-%d %H:%M:%S"), rows=[])
    have_peer = _peer_available()
    for preset in args.presets:
        jobs = [(m, configs[(m, dt)]) for dt in args.expert_dtypes for m in args.modes] + \
               [(m, None) for m in (args.peer_modes or []) if have_peer]
        for mode, config in jobs:
            doc["rows"] += spawn(args, preset, mode, config)
            write_report(out, doc)  # after every worker: a partial sweep still leaves results
    print((out / "results.md").read_text())


def _peer_available() -> bool:
    try:
        import accelerate  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
        return True
    except ImportError:
        print("torch/transformers/accelerate not importable: no Hugging Face peer rows")
        return False


if __name__ == "__main__":
    main()
