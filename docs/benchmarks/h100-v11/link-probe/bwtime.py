"""Host->device copy time over time, nothing else running: 6 experts (2 x 4.7 MB each, switch-base-128's) per
"step", back to back on one stream, CUDA events around every step. Shows whether the copy path itself has
sporadic slow stretches. argv: out [seconds]"""
import json, os, sys, time
import numpy as np, torch
out = sys.argv[1]; os.makedirs(out, exist_ok=True)
secs = float(sys.argv[2]) if len(sys.argv) > 2 else 30
MAT = 768 * 3072 * 2                      # one bf16 matrix of a switch-base expert
E = 128 * 6                               # 6 decoder MoE blocks x 128 experts
host = torch.empty(E * 2 * MAT, dtype=torch.uint8).pin_memory()
dev = torch.empty(6 * 2 * MAT, dtype=torch.uint8, device="cuda")
s = torch.cuda.Stream()
rng = np.random.default_rng(0)
steps_per_batch, times, wall = 64, [], []
t_end = time.time() + secs
while time.time() < t_end:
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(steps_per_batch + 1)]
    wall.append(time.time())
    with torch.cuda.stream(s):
        ev[0].record()
        for j in range(steps_per_batch):
            for b in range(6):
                e = b * 128 + int(rng.integers(128))
                for m in range(2):
                    off = (e * 2 + m) * MAT
                    dev[(b * 2 + m) * MAT:(b * 2 + m + 1) * MAT].copy_(host[off:off + MAT], non_blocking=True)
            ev[j + 1].record()
    ev[-1].synchronize()
    times.append([ev[j].elapsed_time(ev[j + 1]) for j in range(steps_per_batch)])
t = np.array(times)                        # [batches, steps] ms
res = dict(step_bytes=12 * MAT, batches=len(times), wall=wall, step_ms=t.round(4).tolist(),
           median_step_ms=float(np.median(t)), p99_step_ms=float(np.percentile(t, 99)), max_step_ms=float(t.max()),
           batch_ms=t.sum(1).round(3).tolist(), gbps_median=12 * MAT / np.median(t) / 1e6)
json.dump(res, open(os.path.join(out, "bwtime.json"), "w"))
bm = t.sum(1)
print(json.dumps({k: v for k, v in res.items() if k not in ("step_ms", "wall", "batch_ms")}))
print("batch ms (64 steps): min %.2f median %.2f max %.2f; batches > 1.05x median: %d of %d" % (bm.min(), np.median(bm), bm.max(), (bm > 1.05 * np.median(bm)).sum(), len(bm)))
