import json, glob, re, sys, numpy as np
log, js = sys.argv[1], sys.argv[2]
R = re.compile(r"pgj request #(\d+) k=(\d+) n=\d+ posted_ns=(\d+) picked_ns=(\d+) enqueued_ns=(\d+) ids=\[([^\]]*)\] wait #(-?\d+) start_ns=(-?\d+) end_ns=(-?\d+)")
req, waits = {}, {}
for line in open(log):
    m = R.search(line)
    if not m: continue
    seq, k, po, pi, en = map(int, m.groups()[:5]); ids = m.group(6)
    req[seq] = dict(posted=po, picked=pi, enq=en, ids=ids)
    ws, s0, s1 = int(m.group(7)), int(m.group(8)), int(m.group(9))
    if ws > 0: waits[ws] = (s0, s1)
off = min(r['picked'] - r['posted'] for r in req.values())
print("requests", len(req), "waits", len(waits), "clock offset (min picked-posted) us", off / 1e3)
d = json.load(open(js))
for i, run in enumerate(d['runs']):
    t0, t1 = run['t0'] * 1e9 - off, run['t1'] * 1e9 - off   # device clock
    seqs = sorted(s for s, r in req.items() if t0 <= r['posted'] <= t1)
    if not seqs: continue
    lat = np.array([req[s]['picked'] - off - req[s]['posted'] for s in seqs]) / 1e3
    enq = np.array([req[s]['enq'] - req[s]['picked'] for s in seqs]) / 1e3
    w = [(s, (waits[s][1] - waits[s][0]) / 1e3) for s in seqs if s in waits]
    wt = np.array([x for _, x in w])
    posted = np.array([req[s]['posted'] for s in seqs])
    gaps = np.diff(posted) / 1e3
    worst = sorted(w, key=lambda x: -x[1])[:3]
    print(f"run {i}: {run['decode_ms_per_step']:.3f} ms/step  n={len(seqs)} latency us med {np.median(lat):.1f} max {lat.max():.1f} | enqueue med {np.median(enq):.1f} max {enq.max():.1f} | wait sum ms {wt.sum()/1e3:.2f} max {wt.max():.0f} us | post gap max {gaps.max():.0f} us | worst waits {[(s, round(x), round(lat[seqs.index(s)]), req[s]['ids']) for s, x in worst]}")
