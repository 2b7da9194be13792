import json, re, sys, numpy as np
exec(open('an.py').read().split("d = json.load")[0])
d = json.load(open(js))
for i, run in enumerate(d['runs']):
    t0, t1 = run['t0'] * 1e9 - off, run['t1'] * 1e9 - off
    seqs = sorted(s for s, r in req.items() if t0 <= r['posted'] <= t1 and r['ids'].count(',') == 0)
    allq = sorted(s for s, r in req.items() if t0 <= r['posted'] <= t1)
    posted = np.array([req[s]['posted'] for s in seqs])
    first_gap = (posted[1] - posted[0]) / 1e6
    steady = (posted[-1] - posted[1]) / 1e3 / 63
    wt = [(waits[s][1] - waits[s][0]) / 1e3 for s in seqs if s in waits]
    # prefill: last prefill request posted -> first decode post
    pre_last = max(s for s in allq if s < seqs[0])
    print(f"run {i:2d} {run['decode_ms_per_step']:.3f} ms/step | first gap {first_gap:6.2f} ms | steady {steady:6.1f} us/step | decode waits mean {np.mean(wt):5.1f} us | run start->first decode post {(posted[0]-t0)/1e6:6.2f} ms, last prefill post -> first decode post {(posted[0]-req[pre_last]['posted'])/1e6:6.2f} ms")
