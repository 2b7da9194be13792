"""Do copy-engine (DMA) expert copies from the native FFI fetch overlap compute? argv: out tag"""
import json, os, sys, time
import numpy as np, jax, jax.numpy as jnp
from jax.sharding import SingleDeviceSharding
from pregated_jax import native

out, tag = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
native.load()
dev = jax.devices()[0]
kinds = {m.kind for m in dev.addressable_memories()}
D = SingleDeviceSharding(dev, memory_kind=dev.default_memory().kind)
H = SingleDeviceSharding(dev, memory_kind="pinned_host" if "pinned_host" in kinds else dev.default_memory().kind)
E, d, ff, NB = int(os.environ.get("MB_E", 128)), 768, 3072, 6
key = jax.random.PRNGKey(0)
host_wi = [jax.device_put(jax.random.normal(jax.random.fold_in(key, b), (E, d, ff), jnp.bfloat16) * 0.02, H) for b in range(NB)]
host_wo = [jax.device_put(jax.random.normal(jax.random.fold_in(key, 10 + b), (E, ff, d), jnp.bfloat16) * 0.02, H) for b in range(NB)]
stacks = [[native.HostStack.of(host_wi[b]), native.HostStack.of(host_wo[b])] for b in range(NB)]
dense = [jax.device_put(jax.random.normal(jax.random.fold_in(key, 100 + i), (d, ff) if i % 2 == 0 else (ff, d), jnp.bfloat16) * 0.02, D) for i in range(48)]
ids = jax.device_put(jnp.array([5, 17, 33, 64, 99, 120], jnp.int32) % E, D)
x0 = jax.device_put(jnp.ones((1, d), jnp.bfloat16), D)
R = jax.device_put(jax.random.normal(jax.random.fold_in(key, 999), (d, E), jnp.float32), D)


def compute(x, ws):
    for i in range(0, len(ws), 2):
        x = x + jax.nn.relu(x @ ws[i]) @ ws[i + 1]
        x = x / (1 + jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32)))).astype(x.dtype))
    return x


def route(x, R):
    return jnp.argmax(x.astype(jnp.float32) @ R, axis=-1)[0].astype(jnp.int32)


def xla_copy(b, e, hw, ho):
    return (jax.device_put(jax.lax.dynamic_index_in_dim(hw[b], e, keepdims=False), D),
            jax.device_put(jax.lax.dynamic_index_in_dim(ho[b], e, keepdims=False), D))


def make(kind, steps=8):
    def step(x, ids, hw, ho, dense, R):
        acc = jnp.zeros((), jnp.float32)
        if kind == "dma-copy":
            for b in range(NB):
                t, tok = native.fetch_start(ids[b][None], stacks[b])
                t = native.fetch_done(t, tok)
                acc = acc + jnp.sum(t[0].astype(jnp.float32)) + jnp.sum(t[1].astype(jnp.float32))
            return x, acc
        if kind == "dma-both":
            started = [native.fetch_start(ids[b][None], stacks[b]) for b in range(NB)]
        nxt = None
        if kind == "dma-pregate":
            nxt = native.fetch_start(route(x, R)[None], stacks[0])
        if kind == "xla-pregate":
            nxt = xla_copy(0, route(x, R), hw, ho)
        for b in range(NB):
            x = compute(x, dense[8 * b: 8 * b + 4])
            if kind == "dma-ondemand":
                t, tok = native.fetch_start(route(x, R)[None], stacks[b])
                cur = [w[0] for w in native.fetch_done(t, tok, x)]
            elif kind == "dma-pregate":
                t, tok = nxt
                if b + 1 < NB:
                    nxt = native.fetch_start(route(x, R)[None], stacks[b + 1])
                    x, _ = jax.lax.optimization_barrier((x, nxt[1]))  # start b+1 before this block's experts
                    cur = [w[0] for w in native.fetch_done(t, x, nxt[1])]
                else:
                    cur = [w[0] for w in native.fetch_done(t, x)]
            elif kind == "xla-pregate":
                cur = nxt
                if b + 1 < NB:
                    nxt = xla_copy(b + 1, route(x, R), hw, ho)
            elif kind == "dma-both":
                t = native.fetch_done(started[b][0], started[b][1], x)
                acc = acc + jnp.sum(t[0].astype(jnp.float32))
                cur = None
            else:
                cur = None
            if cur is not None:
                x = x + jax.nn.relu(x @ cur[0]) @ cur[1]
            x = compute(x, dense[8 * b + 4: 8 * b + 8])
        return x, acc

    @jax.jit
    def g(x, ids, hw, ho, dense, R):
        def body(i, c):
            x, a = c
            x, a2 = step(x, (ids + i) % E, hw, ho, dense, R)
            return x, a + a2
        return jax.lax.fori_loop(0, steps, body, (x, jnp.zeros((), jnp.float32)))
    return lambda x, ids: g(x, ids, host_wi, host_wo, dense, R)


def bandwidth(k):
    @jax.jit
    def f(ids):
        t, tok = native.fetch_start(ids, stacks[0])
        return native.fetch_done(t, tok)
    idx = jax.device_put(jnp.arange(0, 2 * k, 2, dtype=jnp.int32) % E, D)  # non-adjacent: one copy per row
    jax.block_until_ready(f(idx))
    ts = []
    for _ in range(10):
        t0 = time.perf_counter(); jax.block_until_ready(f(idx)); ts.append(time.perf_counter() - t0)
    nbytes = k * (stacks[0][0].row_bytes + stacks[0][1].row_bytes)
    return dict(k=k, ms=1e3 * float(np.median(ts)), GBps=nbytes / float(np.median(ts)) / 1e9)


res = dict(tag=tag, xla_flags=os.environ.get("XLA_FLAGS"), jax=jax.__version__, rows={}, bw=[])
outs = {}
for kind in ("compute", "xla-pregate", "dma-copy", "dma-both", "dma-ondemand", "dma-pregate"):
    try:
        f = make(kind)
        t0 = time.perf_counter(); r = jax.block_until_ready(f(x0, ids)); comp = time.perf_counter() - t0
        outs[kind] = np.asarray(r[0].astype(jnp.float32))
        ts = []
        for _ in range(15):
            t0 = time.perf_counter(); jax.block_until_ready(f(x0, ids)); ts.append(time.perf_counter() - t0)
        res["rows"][kind] = dict(ms_per_step=1e3 * float(np.median(ts)) / 8, min_ms_per_step=1e3 * min(ts) / 8, compile_s=comp)
    except Exception as e:  # noqa
        res["rows"][kind] = dict(error=str(e)[:600])
    print(kind, res["rows"][kind], flush=True)
if "xla-pregate" in outs and "dma-pregate" in outs:
    res["pregate_max_abs_diff"] = float(np.max(np.abs(outs["xla-pregate"] - outs["dma-pregate"])))
    print("pregate diff", res["pregate_max_abs_diff"])
for k in (1, 6, 16, 48):
    try:
        res["bw"].append(bandwidth(k))
    except Exception as e:  # noqa
        res["bw"].append(dict(k=k, error=str(e)[:300]))
    print(res["bw"][-1], flush=True)
json.dump(res, open(os.path.join(out, f"mb3_{tag}.json"), "w"), indent=0)
