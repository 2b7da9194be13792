"""Decode-step diagnosis: timings, a profile summary, optional no-cond copies. argv: preset mode out [nocond] [narrow]"""
import glob, json, os, sys, time
import numpy as np, jax, jax.numpy as jnp
sys.path.insert(0, os.getcwd())
from pregated_jax.bench.random_model import random_model
from pregated_jax.config import get_preset
from pregated_jax.engine import InferenceEngine
from pregated_jax.engine import fetch as F

preset, mode, out = sys.argv[1:4]
flags = sys.argv[4:]
os.makedirs(out, exist_ok=True)
if "nocond" in flags:
    def _copy_expert(host_wi, host_wo, expert, device):
        e = jnp.maximum(expert, 0)
        wi = jax.lax.dynamic_index_in_dim(host_wi, e, keepdims=False)
        wo = jax.lax.dynamic_index_in_dim(host_wo, e, keepdims=False)
        return jax.device_put(wi, device), jax.device_put(wo, device)
    F._copy_expert = _copy_expert
if "stream" in flags:
    try:
        from jax.experimental.compute_on import compute_on2 as _con
    except ImportError:
        from jax.experimental.compute_on import compute_on as _con
    _dev = jax.memory.Space.Device
    def _stream_copy(host_wi, host_wo, e, device):
        def c(hw, ho, e):
            return (jax.device_put(jax.lax.dynamic_index_in_dim(hw, e, keepdims=False), device),
                    jax.device_put(jax.lax.dynamic_index_in_dim(ho, e, keepdims=False), device))
        return _con(c, compute_type="gpu_stream:1", out_memory_spaces=(_dev, _dev))(host_wi, host_wo, e)
    if "nocond" in flags:
        F._copy_expert = lambda hw, ho, expert, device: _stream_copy(hw, ho, jnp.maximum(expert, 0), device)
    else:
        def _copy_expert(host_wi, host_wo, expert, device):
            def skip(_):
                return (jax.device_put(jnp.zeros(host_wi.shape[1:], host_wi.dtype), device),
                        jax.device_put(jnp.zeros(host_wo.shape[1:], host_wo.dtype), device))
            return jax.lax.cond(expert >= 0, lambda e: _stream_copy(host_wi, host_wo, e, device), skip, expert)
        F._copy_expert = _copy_expert
kw = dict(d_model=64, d_ff=64, d_kv=16, num_heads=4, vocab_size=512) if "narrow" in flags else {}
cfg = get_preset(preset, routing="conventional" if mode == "speculative" else "pregated",
                 dtype="float32" if "narrow" in flags else "bfloat16", **kw)
model = random_model(cfg, experts_on_host=mode != "gpu-only")
eng = InferenceEngine(model, mode=mode, check_every=10**9)
del model
ids = np.random.default_rng(0).integers(2, 500, (1, 256 if "narrow" not in flags else 32)).astype(np.int32)
eng.generate(ids, max_new_tokens=64)
runs = []
for _ in range(5):
    g = eng.generate(ids, max_new_tokens=64)
    s = g.stats
    runs.append(dict(prefill_ms=1e3 * s.prefill_s, decode_ms_per_step=1e3 * s.decode_s / 64))
res = dict(tokens=g.tokens.tolist(), preset=preset, mode=mode, flags=flags, xla_flags=os.environ.get("XLA_FLAGS"), runs=runs)
tdir = os.path.join(out, "trace")
if "noprofile" in flags:
    tag = "_".join([preset, mode] + flags + [os.environ.get("TAG", "")])
    json.dump(res, open(os.path.join(out, f"diag_{tag}.json"), "w"), indent=1)
    print(json.dumps(res))
    sys.exit(0)
opts = jax.profiler.ProfileOptions()
opts.python_tracer_level = 0
jax.profiler.start_trace(tdir, profiler_options=opts)
eng.generate(ids, max_new_tokens=64)
jax.profiler.stop_trace()
pb = glob.glob(os.path.join(tdir, "**", "*.xplane.pb"), recursive=True)
summary = []
if pb:
    from jax.profiler import ProfileData
    pd = ProfileData.from_file(pb[0])
    for plane in pd.planes:
        for line in plane.lines:
            evs = list(line.events)
            if len(evs) < 5:
                continue
            tot, names = 0, {}
            for e in evs:
                tot += e.duration_ns
                n = e.name[:70]
                c = names.setdefault(n, [0, 0]); c[0] += 1; c[1] += e.duration_ns
            top = sorted(names.items(), key=lambda kv: -kv[1][1])[:12]
            summary.append(dict(plane=plane.name, line=line.name, n=len(evs), busy_ms=tot / 1e6,
                                span_ms=(max(e.end_ns for e in evs) - min(e.start_ns for e in evs)) / 1e6,
                                top=[(k, v[0], round(v[1] / 1e6, 3)) for k, v in top]))
res["profile"] = summary
print(json.dumps(res))
tag = "_".join([preset, mode] + flags + (["xla" + str(abs(hash(os.environ.get("XLA_FLAGS", ""))) % 1000)] if os.environ.get("XLA_FLAGS") else []))
with open(os.path.join(out, f"diag_{tag}.json"), "w") as f:
    json.dump(res, f, indent=1)
import shutil
shutil.rmtree(tdir, ignore_errors=True)
