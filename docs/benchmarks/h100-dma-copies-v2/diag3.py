"""Engine decode variants. argv: preset mode out [spc=N] [copy=xla|dma|auto] [ids=bench] [batch=N] [stop=1] [guess=1] [miss=xla|dma] [profile]

stop=1: the decode loop stops at EOS (EngineConfig.stop_when_finished; default: every step runs). guess=1: EngineConfig.guess_first_block.
miss=: the copy method of the guess's and speculative mode's misses. batch=N: N rows of the benchmark's ids.
"""
import glob, json, os, sys, time
import numpy as np, jax
sys.path.insert(0, os.environ.get("PGJ_SRC", os.getcwd()))
from pregated_jax.bench.random_model import random_model
from pregated_jax.config import get_preset
from pregated_jax.engine import InferenceEngine

preset, mode, out = sys.argv[1:4]
flags = dict(f.split("=") if "=" in f else (f, "1") for f in sys.argv[4:])
os.makedirs(out, exist_ok=True)
cfg = get_preset(preset, routing="conventional" if mode == "speculative" else "pregated", dtype="bfloat16")
model = random_model(cfg, experts_on_host=mode != "gpu-only")
eng = InferenceEngine(model, mode=mode, stop_when_finished=flags.get("stop") == "1", decode_steps_per_call=int(flags.get("spc", 8)),
                      copy_method=flags.get("copy", "auto"), guess_first_block=flags.get("guess", "0") == "1")
del model
if "miss" in flags:
    eng.miss_copy_method = flags["miss"]
nb = int(flags.get("batch", 1))
ids = (np.random.default_rng(0).integers(2, min(cfg.vocab_size, 32000), (nb, 256), dtype=np.int32)  # as benchmark.py
       if flags.get("ids") == "bench" else np.random.default_rng(0).integers(2, 500, (1, 256)).astype(np.int32))
eng.generate(ids, max_new_tokens=64)
import resource


def cpu_stat():
    """The cgroup's CPU throttling counters and this process's context switches."""
    out = {}
    try:
        for line in open("/sys/fs/cgroup/cpu.stat"):
            k, v = line.split()
            out[k] = int(v)
    except OSError:
        pass
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out["nvcsw"], out["nivcsw"] = ru.ru_nvcsw, ru.ru_nivcsw
    return out


import gc
gc_events, gc_start = [], {}


def on_gc(phase, info):
    if phase == "start":
        gc_start["t"] = time.time()
    else:
        gc_events.append((gc_start.get("t", 0), info["generation"], 1e3 * (time.time() - gc_start.get("t", 0)), info["collected"]))


gc.callbacks.append(on_gc)
dispatch = []
inner = eng._decode_step


def timed_step(*a, **k):
    t = time.time()
    out = inner(*a, **k)
    dispatch.append((t, 1e3 * (time.time() - t)))
    return out


eng._decode_step = timed_step
gc_mode = os.environ.get("GCMODE", "default")
if gc_mode == "freeze":
    gc.collect(); gc.freeze()
elif gc_mode == "off":
    gc.disable()
runs = []
for _ in range(int(os.environ.get("RUNS", 5))):
    before, t0 = cpu_stat(), time.time()
    del gc_events[:], dispatch[:]
    g = eng.generate(ids, max_new_tokens=64)
    after = cpu_stat()
    runs.append(dict(prefill_ms=1e3 * g.stats.prefill_s, decode_ms_per_step=1e3 * g.stats.decode_s / g.stats.steps,
                     steps=g.stats.steps, spec=[g.stats.speculative_hits, g.stats.speculative_needed, g.stats.speculative_wasted],
                     t0=t0, t1=time.time(), gc=[(round(t - t0, 4), gen, round(ms, 2), c) for t, gen, ms, c in gc_events],
                     dispatch=[(round(t - t0, 4), round(ms, 2)) for t, ms in dispatch], cpu={k: after[k] - before.get(k, 0) for k in after if k in
                     ("nr_throttled", "throttled_usec", "usage_usec", "nvcsw", "nivcsw")}))
res = dict(tokens=g.tokens.tolist(), preset=preset, mode=mode, flags=flags, copy=eng.copy_method, gc_mode=gc_mode,
           xla_flags=os.environ.get("XLA_FLAGS"), runs=runs,
           median_decode=float(np.median([r["decode_ms_per_step"] for r in runs])),
           median_prefill=float(np.median([r["prefill_ms"] for r in runs])))
tag = "_".join([preset, mode] + [f"{k}{v}" for k, v in flags.items()] + [os.environ.get("TAG", "")]).strip("_")
if "profile" in flags:
    tdir = os.path.join(out, "trace_" + tag)
    opts = jax.profiler.ProfileOptions()
    opts.python_tracer_level = 0
    jax.profiler.start_trace(tdir, profiler_options=opts)
    eng.generate(ids, max_new_tokens=64)
    jax.profiler.stop_trace()
    pb = glob.glob(os.path.join(tdir, "**", "*.xplane.pb"), recursive=True)
    summary = []
    from jax.profiler import ProfileData
    for plane in ProfileData.from_file(pb[0]).planes:
        for line in plane.lines:
            evs = sorted(line.events, key=lambda e: e.start_ns)
            if len(evs) < 5:
                continue
            names = {}
            for e in evs:
                c = names.setdefault(e.name[:70], [0, 0]); c[0] += 1; c[1] += e.duration_ns
            top = sorted(names.items(), key=lambda kv: -kv[1][1])[:15]
            # the last 1/2 of the events (decode), first 300 of them with start offsets, for the timeline
            tail = evs[len(evs) // 2:][:300]
            t0 = tail[0].start_ns if tail else 0
            summary.append(dict(plane=plane.name, line=line.name, n=len(evs),
                                busy_ms=sum(e.duration_ns for e in evs) / 1e6,
                                span_ms=(max(e.end_ns for e in evs) - evs[0].start_ns) / 1e6,
                                top=[(k, v[0], round(v[1] / 1e6, 3)) for k, v in top],
                                timeline=[(e.name[:40], round((e.start_ns - t0) / 1e3, 1), round(e.duration_ns / 1e3, 1)) for e in tail]))
    res["profile"] = summary
    # the GPU lines on one clock: 4 ms from 60% into the compute stream
    gpu = [(plane.name, line) for plane in ProfileData.from_file(pb[0]).planes if "GPU" in plane.name
           for line in plane.lines if len(list(line.events)) > 50]
    main = max(gpu, key=lambda pl: len(list(pl[1].events)))[1]
    mev = sorted(main.events, key=lambda e: e.start_ns)
    t0 = mev[int(len(mev) * 0.6)].start_ns
    res["aligned"] = {line.name: [(e.name[:40], round((e.start_ns - t0) / 1e3, 1), round(e.duration_ns / 1e3, 1))
                                  for e in sorted(line.events, key=lambda e: e.start_ns) if 0 <= e.start_ns - t0 < 4e6]
                      for _, line in gpu}
    import shutil
    shutil.rmtree(tdir, ignore_errors=True)
json.dump(res, open(os.path.join(out, f"diag_{tag}.json"), "w"), indent=0)
print(json.dumps({k: v for k, v in res.items() if k not in ("profile", "tokens")}))
print("tokens", res["tokens"][0][:16])
