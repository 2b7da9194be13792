"""Where does speculative mode hang at switch-large-128? Run from the repository root:

    python docs/benchmarks/h100-v6/hangs/spec.py PRESET OUT [copy=auto|xla|dma] [spc=8] [budget=GiB] [eagercounter=1]

Four generations (warm-up, timed, memory-tracked, block-profiled), a timestamped line per phase with the speculative
hits and the first tokens; dumps every Python thread's stack after $HANG_S seconds (default 200). eagercounter=1 with
PREGATED_JAX_DMA_DEVICE_WAIT=1 restores the h100-v5 engine (device wait in prefill too), which hung here.
"""
import faulthandler, json, os, sys, time
import numpy as np, jax
sys.path.insert(0, os.getcwd())
from pregated_jax.bench.random_model import random_model
from pregated_jax.config import get_preset
from pregated_jax.engine import InferenceEngine

preset, out = sys.argv[1:3]
flags = dict(f.split("=") for f in sys.argv[3:])
os.makedirs(out, exist_ok=True)
faulthandler.dump_traceback_later(int(os.environ.get("HANG_S", 200)), exit=False)
T0 = time.time()
import threading; print("main tid", threading.get_native_id(), flush=True)
log = lambda *a: print(f"[{time.time() - T0:7.1f}s]", *a, flush=True)  # noqa: E731
cfg = get_preset(preset, routing="conventional", dtype="bfloat16")
model = random_model(cfg, experts_on_host=True)
log("model built")
kw = dict(mode="speculative", check_every=10**9, decode_steps_per_call=int(flags.get("spc", 8)),
          copy_method=flags.get("copy", "auto"))
if "budget" in flags:
    kw["device_budget_bytes"] = int(float(flags["budget"]) * 2**30)
if flags.get("eagercounter") == "1":  # the old eager done: device-side wait only
    import functools
    from pregated_jax import native
    from pregated_jax.engine import fetch as F
    @functools.partial(jax.jit, donate_argnums=0)
    def _old_finish(pending):
        wi, wo = native.fetch_done([pending.slots.wi, pending.slots.wo], host_wait=False)
        return F.ExpertSlots(wi, wo, pending.slots.expert_ids)
    F._dma_finish = _old_finish
eng = InferenceEngine(model, **kw)
del model
log("engine built", eng.copy_method, eng.miss_copy_method)
ids = np.random.default_rng(0).integers(2, 500, (1, 256)).astype(np.int32)
res = {}
for name, extra in (("warmup", {}), ("timed", {}), ("memory", dict(track_memory=True)),
                    ("profile", dict(profile_blocks=True))):
    t = time.time()
    g = eng.generate(ids, max_new_tokens=64, progress=lambda s, n: log(name, "step", s), **extra)
    res[name] = dict(wall_s=time.time() - t, prefill_ms=1e3 * g.stats.prefill_s, decode_s=g.stats.decode_s,
                     hits=g.stats.speculative_hits, needed=g.stats.speculative_needed,
                     tokens=g.tokens[0].tolist())
    log(name, json.dumps({k: v for k, v in res[name].items() if k != "tokens"}), "tokens", res[name]["tokens"][:12])
json.dump(res, open(os.path.join(out, f"spec_{preset}_{'_'.join(sys.argv[3:])}.json"), "w"))
