"""Where each while loop of XLA's optimized HLO runs: inside a command buffer (on the device) or not.

argv: dump_dir. Reads *after_optimizations.txt; prints, per module with a while loop, each while's
enclosing computation and the opcodes in its body and condition that are not inside a command buffer.
"""
import collections, glob, json, os, re, sys

HEAD = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
INSTR = re.compile(r"^\s+(?:ROOT )?%?([\w.\-]+) = .*? ([a-z][a-z0-9\-]*)\((.*)$")
NOOP = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant"}


def parse(path):
    comps, cur, entry = {}, None, None
    for line in open(path):
        m = HEAD.match(line)
        if m:
            cur = m.group(2); comps[cur] = []
            if m.group(1):
                entry = cur
            continue
        if line.startswith("}"):
            cur = None; continue
        m = INSTR.match(line)
        if m and cur:
            comps[cur].append((m.group(1), m.group(2), line))
    return comps, entry


out = []
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*after_optimizations.txt"))):
    comps, entry = parse(path)
    whiles = [(c, name, line) for c, ins in comps.items() for name, op, line in ins if op == "while"]
    if not whiles:
        continue
    # which computations are command buffers: called from a `call` whose callee name has command_buffer
    cb = {c for c in comps if "command_buffer" in c}
    def inside_cb(comp, seen=()):
        if comp in cb:
            return True
        callers = [c for c, ins in comps.items() for _, _, l in ins if re.search(r"[=,]\s*%?" + re.escape(comp) + r"\b", l) and c not in seen]
        return bool(callers) and all(inside_cb(c, seen + (comp,)) for c in callers)
    rep = dict(module=os.path.basename(path), n_whiles=len(whiles), command_buffers=len(cb), whiles=[])
    for comp, name, line in whiles:
        body = re.search(r"body=%?([\w.\-]+)", line).group(1)
        cond = re.search(r"condition=%?([\w.\-]+)", line).group(1)
        ops = collections.Counter(op for _, op, _ in comps.get(body, []) if op not in NOOP)
        non_cmd = [l.strip()[:200] for _, op, l in comps.get(body, []) + comps.get(cond, [])
                   if op not in NOOP and op not in ("fusion", "custom-call", "call", "while", "conditional")]
        rep["whiles"].append(dict(name=name, in_comp=comp, in_command_buffer=inside_cb(comp), body=body,
                                  body_ops=dict(ops), cond_ops=dict(collections.Counter(op for _, op, _ in comps.get(cond, []) if op not in NOOP)),
                                  other_ops_sample=non_cmd[:12]))
    out.append(rep)
print(json.dumps(out, indent=1))
