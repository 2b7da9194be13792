"""Do host->device expert copies overlap compute inside one jit? argv: out tag"""
import glob, json, os, sys, time
import numpy as np, jax, jax.numpy as jnp
from jax.sharding import SingleDeviceSharding

out, tag = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
dev = jax.devices()[0]
kinds = {m.kind for m in dev.addressable_memories()}
D = SingleDeviceSharding(dev, memory_kind=dev.default_memory().kind)
H = SingleDeviceSharding(dev, memory_kind="pinned_host" if "pinned_host" in kinds else dev.default_memory().kind)
E, d, ff, NB = int(os.environ.get("MB_E", 128)), 768, 3072, 6
key = jax.random.PRNGKey(0)
host_wi = [jax.device_put(jax.random.normal(jax.random.fold_in(key, b), (E, d, ff), jnp.bfloat16) * 0.02, H) for b in range(NB)]
host_wo = [jax.device_put(jax.random.normal(jax.random.fold_in(key, 10 + b), (E, ff, d), jnp.bfloat16) * 0.02, H) for b in range(NB)]
dense = [jax.device_put(jax.random.normal(jax.random.fold_in(key, 100 + i), (d, ff) if i % 2 == 0 else (ff, d), jnp.bfloat16) * 0.02, D) for i in range(48)]
ids = jax.device_put(jnp.array([5, 17, 33, 64, 99, 120], jnp.int32), D)
x0 = jax.device_put(jnp.ones((1, d), jnp.bfloat16), D)


def compute(x, ws):
    for i in range(0, len(ws), 2):
        x = x + jax.nn.relu(x @ ws[i]) @ ws[i + 1]
        x = x / (1 + jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32)))).astype(x.dtype))
    return x


def copy_slice(hw, ho, e):
    return (jax.device_put(jax.lax.dynamic_index_in_dim(hw, e, keepdims=False), D),
            jax.device_put(jax.lax.dynamic_index_in_dim(ho, e, keepdims=False), D))


def copy_cond(hw, ho, e):
    return jax.lax.cond(e >= 0, lambda e: copy_slice(hw, ho, e),
                        lambda e: (jax.device_put(jnp.zeros(hw.shape[1:], hw.dtype), D),
                                   jax.device_put(jnp.zeros(ho.shape[1:], ho.dtype), D)), e)


def copy_switch(hw, ho, e):
    branches = [lambda _, j=j: (jax.device_put(hw[j], D), jax.device_put(ho[j], D)) for j in range(E)]
    return jax.lax.switch(e, branches, 0)


def copy_chunks(hw, ho, e, n=8):
    """The expert as n dynamic slices of rows (smaller kernels)."""
    wi = jnp.concatenate([jax.device_put(jax.lax.dynamic_slice(hw, (e, r * (d // n), 0), (1, d // n, ff)), D) for r in range(n)], 1)[0]
    wo = jnp.concatenate([jax.device_put(jax.lax.dynamic_slice(ho, (e, r * (ff // n), 0), (1, ff // n, d)), D) for r in range(n)], 1)[0]
    return wi, wo


COPIES = dict(slice=copy_slice, cond=copy_cond, switch=copy_switch, chunks=copy_chunks)


R = jax.device_put(jax.random.normal(jax.random.fold_in(key, 999), (d, E), jnp.float32), D)


def route(x, R):
    return jnp.argmax(x.astype(jnp.float32) @ R, axis=-1)[0].astype(jnp.int32)


def make(kind, copy, steps=8):
    """compute | copy | both (independent) | ondemand (route, copy, use) | pregate (copy b+1 routed in b)."""
    def step(x, ids, host_wi, host_wo, dense, R):
        acc = jnp.zeros((), jnp.float32)
        nxt = None
        if kind == "pregate":
            nxt = COPIES[copy](host_wi[0], host_wo[0], route(x, R))
        for b in range(NB):
            if kind == "copy" or kind == "both":
                wi, wo = COPIES[copy](host_wi[b], host_wo[b], ids[b])
                acc = acc + jnp.sum(wi.astype(jnp.float32)) + jnp.sum(wo.astype(jnp.float32))
            if kind == "copy":
                continue
            x = compute(x, dense[8 * b: 8 * b + 4])
            if kind == "ondemand":
                cur = COPIES[copy](host_wi[b], host_wo[b], route(x, R))
            elif kind == "pregate":
                cur = nxt
                if b + 1 < NB:
                    nxt = COPIES[copy](host_wi[b + 1], host_wo[b + 1], route(x, R))
            if kind in ("ondemand", "pregate"):
                x = x + jax.nn.relu(x @ cur[0]) @ cur[1]
            x = compute(x, dense[8 * b + 4: 8 * b + 8])
        return x, acc

    @jax.jit
    def g(x, ids, host_wi, host_wo, dense, R):
        def body(i, c):
            x, a = c
            x, a2 = step(x, (ids + i) % E, host_wi, host_wo, dense, R)
            return x, a + a2
        return jax.lax.fori_loop(0, steps, body, (x, jnp.zeros((), jnp.float32)))
    return lambda x, ids: g(x, ids, host_wi, host_wo, dense, R)


res = dict(tag=tag, xla_flags=os.environ.get("XLA_FLAGS"), jax=jax.__version__, rows={})
variants = [("compute", "slice")] + [(k, c) for c in ("slice", "cond", "switch") for k in ("copy", "both", "ondemand", "pregate")] + [("pregate", "chunks")]
for kind, copy in variants:
    name = f"{kind}-{copy}" if kind != "compute" else "compute"
    try:
        f = make(kind, copy)
        t0 = time.perf_counter(); jax.block_until_ready(f(x0, ids)); comp = time.perf_counter() - t0
        ts = []
        for _ in range(15):
            t0 = time.perf_counter(); jax.block_until_ready(f(x0, ids)); ts.append(time.perf_counter() - t0)
        res["rows"][name] = dict(ms_per_step=1e3 * float(np.median(ts)) / 8, min_ms_per_step=1e3 * min(ts) / 8, compile_s=comp)
    except Exception as e:  # noqa
        res["rows"][name] = dict(error=str(e)[:400])
    print(name, res["rows"][name], flush=True)

if "profile" in sys.argv[3:]:
    for name in ("both-slice", "pregate-slice", "pregate-switch", "pregate-cond"):
        kind, copy = name.split("-")
        f = make(kind, copy)
        jax.block_until_ready(f(x0, ids))
        tdir = os.path.join(out, "tr_" + name)
        jax.profiler.start_trace(tdir)
        jax.block_until_ready(f(x0, ids))
        jax.profiler.stop_trace()
        pb = glob.glob(os.path.join(tdir, "**", "*.xplane.pb"), recursive=True)
        from jax.profiler import ProfileData
        lines = []
        for plane in ProfileData.from_file(pb[0]).planes:
            if "GPU" not in plane.name:
                continue
            for line in plane.lines:
                evs = [(e.name[:40], e.start_ns, e.duration_ns) for e in line.events]
                if evs:
                    lines.append(dict(line=line.name, events=evs[:400]))
        res["trace_" + name] = lines
        import shutil; shutil.rmtree(tdir, ignore_errors=True)
json.dump(res, open(os.path.join(out, f"mb_{tag}.json"), "w"), indent=0)
