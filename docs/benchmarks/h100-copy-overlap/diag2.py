"""Decode/prefill variants. argv: preset mode out [spc=N] [unroll] [nocond] [routed] [routedloop] [profile]"""
import functools, glob, json, os, sys, time
import numpy as np, jax, jax.numpy as jnp
sys.path.insert(0, os.getcwd())
from pregated_jax.bench.random_model import random_model
from pregated_jax.config import get_preset
from pregated_jax.engine import InferenceEngine
from pregated_jax.engine import fetch as F
from pregated_jax.engine import engine as E

preset, mode, out = sys.argv[1:4]
flags = sys.argv[4:]
spc = 1
for f in flags:
    if f.startswith("spc="):
        spc = int(f[4:])
os.makedirs(out, exist_ok=True)
if "unroll" in flags:
    _orig = jax.lax.fori_loop
    E.jax.lax.fori_loop = lambda a, b, body, init: _orig(a, b, body, init, unroll=True)
if "nocond" in flags:
    def _copy_expert(host_wi, host_wo, expert, device):
        e = jnp.maximum(expert, 0)
        wi = jax.lax.dynamic_index_in_dim(host_wi, e, keepdims=False)
        wo = jax.lax.dynamic_index_in_dim(host_wo, e, keepdims=False)
        return jax.device_put(wi, device), jax.device_put(wo, device)
    F._copy_expert = _copy_expert
if "routedloop" in flags:
    @functools.partial(jax.jit, static_argnums=(3, 4))
    def fetch_loop(host_wi, host_wo, decision, k, device):
        ids = F.needed_experts(decision, k)  # valid ids first, ascending
        n = jnp.sum(ids >= 0)
        def body(j, t):
            wi, wo = t
            e = ids[j]
            a = jax.device_put(jax.lax.dynamic_index_in_dim(host_wi, e, keepdims=False), device)
            b = jax.device_put(jax.lax.dynamic_index_in_dim(host_wo, e, keepdims=False), device)
            return (jax.lax.dynamic_update_index_in_dim(wi, a, j, 0), jax.lax.dynamic_update_index_in_dim(wo, b, j, 0))
        z = lambda s: jax.device_put(jnp.zeros((k,) + s.shape[1:], s.dtype), device)
        wi, wo = jax.lax.fori_loop(0, n, body, (z(host_wi), z(host_wo)))
        return F.ExpertSlots(wi, wo, ids), n.astype(jnp.int32)
if "routed" in flags or "routedloop" in flags:
    fetch = fetch_loop if "routedloop" in flags else F.fetch_decision
    _op, _oe = InferenceEngine._prefetch, InferenceEngine._experts
    def _prefetch(self, sp, i, decision, k, dense, ctx):
        if dense and self.chunk >= self.num_experts and self.cache_slots is None:
            b = sp.blocks[i]
            slots, copied = fetch(b.host_wi, b.host_wo, decision, k, self.mem.on_device)
            ctx.add_copied(copied)
            return ("slots", slots, decision)
        return _op(self, sp, i, decision, k, dense, ctx)
    def _experts(self, sp, i, x, h, decision, prefetched, k, dense, ctx):
        if dense and self.config.mode in ("pregated", "on-demand") and self.cache_slots is None:
            b = sp.blocks[i]
            if prefetched is None:
                slots, copied = fetch(b.host_wi, b.host_wo, decision, k, self.mem.on_device)
                ctx.add_copied(copied)
            else:
                slots = prefetched[1]
            return b.ffn_output(x, h, decision, slots)
        return _oe(self, sp, i, x, h, decision, prefetched, k, dense, ctx)
    InferenceEngine._prefetch, InferenceEngine._experts = _prefetch, _experts

cfg = get_preset(preset, routing="conventional" if mode == "speculative" else "pregated", dtype="bfloat16")
t0 = time.time()
model = random_model(cfg, experts_on_host=mode != "gpu-only")
eng = InferenceEngine(model, mode=mode, check_every=10**9, decode_steps_per_call=spc)
del model
build_s = time.time() - t0
ids = np.random.default_rng(0).integers(2, 500, (1, 256)).astype(np.int32)
t0 = time.time()
eng.generate(ids, max_new_tokens=64)
warm_s = time.time() - t0
runs = []
for _ in range(5):
    g = eng.generate(ids, max_new_tokens=64)
    s = g.stats
    runs.append(dict(prefill_ms=1e3 * s.prefill_s, decode_ms_per_step=1e3 * s.decode_s / 64,
                     copied=int(s.experts_copied) if hasattr(s, "experts_copied") else None))
res = dict(tokens=g.tokens.tolist(), preset=preset, mode=mode, flags=flags, build_s=build_s, warm_s=warm_s,
           xla_flags=os.environ.get("XLA_FLAGS"), runs=runs,
           median_decode=float(np.median([r["decode_ms_per_step"] for r in runs])),
           median_prefill=float(np.median([r["prefill_ms"] for r in runs])))
tag = "_".join([preset, mode] + [f.replace("=", "") for f in flags] + [os.environ.get("TAG", "")]).strip("_")
if "profile" in flags:
    tdir = os.path.join(out, "trace_" + tag)
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
                    c = names.setdefault(e.name[:70], [0, 0]); c[0] += 1; c[1] += e.duration_ns
                top = sorted(names.items(), key=lambda kv: -kv[1][1])[:12]
                summary.append(dict(plane=plane.name, line=line.name, n=len(evs), busy_ms=tot / 1e6,
                                    span_ms=(max(e.end_ns for e in evs) - min(e.start_ns for e in evs)) / 1e6,
                                    top=[(k, v[0], round(v[1] / 1e6, 3)) for k, v in top]))
    res["profile"] = summary
    import shutil
    shutil.rmtree(tdir, ignore_errors=True)
json.dump(res, open(os.path.join(out, f"diag_{tag}.json"), "w"), indent=1)
print(json.dumps({k: v for k, v in res.items() if k not in ("profile", "tokens")}))
print("tokens", res["tokens"][0][:16])
