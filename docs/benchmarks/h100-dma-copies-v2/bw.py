"""Host->device copy bandwidth by transfer size: pinned host memory, back-to-back on one stream (torch)."""
import json, os, sys, time
import torch
out = sys.argv[1]; os.makedirs(out, exist_ok=True)
MB = 1 << 20
host = torch.empty(512 * MB, dtype=torch.uint8).pin_memory()
dev = torch.empty(512 * MB, dtype=torch.uint8, device="cuda")
s = torch.cuda.Stream()
res = []
for size in [1 * MB, 2359296, 4718592, 9437184, 18874368, 56623104, 113246208, 452984832]:
    n = max(1, (452984832 // size))
    for rep in range(4):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(s):
            a.record()
            for i in range(n):
                dev[i * size:(i + 1) * size].copy_(host[i * size:(i + 1) * size], non_blocking=True)
            b.record()
        b.synchronize()
        ms = a.elapsed_time(b)
    res.append(dict(bytes=size, copies=n, ms=ms, gbps=n * size / ms / 1e6))
    print(res[-1], flush=True)
json.dump(res, open(os.path.join(out, "bw.json"), "w"), indent=1)
