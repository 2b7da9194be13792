"""Load-balanced expert placement over the mesh axis `expert`: routing traces, placements, applying them.

With experts sharded on E over M devices, physical slot p of a block's expert stack lives on device
p // (E / M). A placement is, per MoE block, a permutation `perm` [E]: physical slot p holds logical expert
perm[p]. The router keeps its logical order (weights, losses and decisions unchanged); each `Experts` module
maps a decision's logical ids to physical slots before dispatch (`Experts.phys_of_logical`), so outputs are
those of the unplaced model.

- `RoutingTrace`: per MoE block, tokens per expert and co-activation counts (steps in which two experts both
  receive tokens), recorded by `record_routing` (teacher-forced calibration pass) or built from counts.
- `greedy_placement`: heaviest expert first onto the least-loaded device with a free slot (equal counts per
  device), then pairwise swaps while they lower the sum of squared device loads.
- `anticorrelated_placement`: the same, with a penalty for sharing a device with experts that fire in the
  same steps (their loads coincide in time).
- `apply_placement`: permutes the expert stacks (and optimizer moments) of a model from its current placement
  to a new one; `save_placement` / `load_placement` store it as `placement.json` beside a checkpoint, and
  `pregated_jax.load_model` restores it.

Block names are "encoder/<i>" and "decoder/<i>" (i: the block's index in its stack).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

PLACEMENT_FILE = "placement.json"
METHODS = ("greedy", "anticorrelated")


def moe_block_names(config) -> list[str]:
    """The MoE blocks of a model config, encoder first: ["encoder/1", "encoder/3", ..., "decoder/1", ...]."""
    return [f"{stack}/{i}" for stack in ("encoder", "decoder") for i in config.sparse_blocks(stack)]


def _experts_module(model, name: str):
    stack, _, index = name.partition("/")
    return getattr(model, stack).blocks[int(index)].experts


# --- traces --------------------------------------------------------------------------------------

@dataclasses.dataclass
class RoutingTrace:
    """Per MoE block: tokens routed to each expert, and co-activation counts over routing steps.

    counts[b] [E] int64: tokens sent to each logical expert. coactivation[b] [E, E] int64: the number of steps
    (one forward pass of one batch) in which experts i and j both received a token; the diagonal counts the
    steps in which expert i did. steps: the number of steps recorded.
    """

    num_experts: int
    counts: dict[str, np.ndarray]
    coactivation: dict[str, np.ndarray]
    steps: int = 0
    meta: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def empty(cls, num_experts: int, blocks: Iterable[str], **meta) -> "RoutingTrace":
        e = int(num_experts)
        return cls(e, {b: np.zeros(e, np.int64) for b in blocks},
                   {b: np.zeros((e, e), np.int64) for b in blocks}, 0, dict(meta))

    def add_step(self, per_block: dict[str, np.ndarray]) -> None:
        """Adds one step: block -> expert ids [any shape] of the tokens routed there (real tokens only)."""
        for b, ids in per_block.items():
            if b not in self.counts:
                raise ValueError(f"block {b!r} is not in this trace; blocks: {list(self.counts)}")
            ids = np.asarray(ids).reshape(-1)
            bad = ids[(ids < 0) | (ids >= self.num_experts)]
            if bad.size:
                raise ValueError(f"block {b!r}: expert id {int(bad[0])} outside [0, {self.num_experts})")
            c = np.bincount(ids, minlength=self.num_experts)  # [E]
            active = (c > 0).astype(np.int64)  # [E]
            self.counts[b] += c
            self.coactivation[b] += np.outer(active, active)
        self.steps += 1

    def to_json(self) -> dict:
        return {"num_experts": self.num_experts, "steps": self.steps, "meta": self.meta,
                "counts": {b: c.tolist() for b, c in self.counts.items()},
                "coactivation": {b: c.tolist() for b, c in self.coactivation.items()}}

    @classmethod
    def from_json(cls, d: dict, where: str = "trace") -> "RoutingTrace":
        """Reads `to_json`'s dict; a trace without co-activation counts gets zeros. Checks every shape."""
        if "num_experts" not in d or "counts" not in d:
            raise ValueError(f"{where}: a routing trace needs 'num_experts' and 'counts', got keys {sorted(d)}")
        e = int(d["num_experts"])
        counts = {b: np.asarray(c, np.int64) for b, c in d["counts"].items()}
        co = {b: np.asarray(c, np.int64) for b, c in (d.get("coactivation") or {}).items()}
        for b, c in counts.items():
            if c.shape != (e,):
                raise ValueError(f"{where}: counts of block {b!r} have shape {c.shape}, expected ({e},) "
                                 f"(num_experts {e})")
            if (c < 0).any():
                raise ValueError(f"{where}: counts of block {b!r} hold a negative value {int(c.min())}")
            co.setdefault(b, np.zeros((e, e), np.int64))
        for b, c in co.items():
            if b not in counts:
                raise ValueError(f"{where}: co-activation of block {b!r}, which has no counts")
            if c.shape != (e, e):
                raise ValueError(f"{where}: co-activation of block {b!r} has shape {c.shape}, expected ({e}, {e})")
        return cls(e, counts, co, int(d.get("steps", 0)), dict(d.get("meta", {})))

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_json()))

    @classmethod
    def load(cls, path) -> "RoutingTrace":
        return cls.from_json(json.loads(Path(path).read_text()), str(path))


def record_routing(model, batches: Iterable[dict], trace: RoutingTrace | None = None, **meta) -> RoutingTrace:
    """Teacher-forced calibration: runs `model` over `batches` (dicts with input_ids, attention_mask,
    decoder_input_ids, decoder_attention_mask [B, L]) and records, per MoE block and batch, the experts its
    tokens were dispatched to: in pre-gated models, the decision of the previous block's pre-gate. Padding
    tokens and capacity-dropped tokens are not counted."""
    from flax import nnx

    names = moe_block_names(model.config)
    trace = trace or RoutingTrace.empty(model.config.num_experts, names, **meta)
    graphdef, state = nnx.split(model)

    @jax.jit
    def decisions(state, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask):
        m = nnx.merge(graphdef, state)
        _, aux = m(input_ids, decoder_input_ids, attention_mask, decoder_attention_mask, return_aux=True)
        ds = list(aux.encoder_decisions) + list(aux.decoder_decisions)
        return [d.expert_index for d in ds], [d.keep for d in ds]  # each [B, L]

    for batch in batches:
        idx, keep = jax.device_get(decisions(state, batch["input_ids"], batch["attention_mask"],
                                             batch["decoder_input_ids"], batch["decoder_attention_mask"]))
        masks = {"encoder": np.asarray(batch["attention_mask"]) > 0,
                 "decoder": np.asarray(batch["decoder_attention_mask"]) > 0}
        trace.add_step({n: i[k & masks[n.split("/")[0]]] for n, i, k in zip(names, idx, keep)})
    return trace


def synthetic_trace(blocks: int, experts: int, steps: int, tokens: int, zipf_a: float, seed: int = 0) -> RoutingTrace:
    """Zipf-skewed routing: each block ranks its experts by a random permutation; every step routes `tokens`
    tokens per block, each to rank r with probability ~ 1 / (r + 1)^zipf_a."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, experts + 1) ** zipf_a  # [E] by rank
    p /= p.sum()
    names = [f"block{b}" for b in range(blocks)]
    ranks = [rng.permutation(experts) for _ in names]  # expert id of each rank, per block
    trace = RoutingTrace.empty(experts, names, synthetic=dict(blocks=blocks, experts=experts, steps=steps,
                                                              tokens=tokens, zipf_a=zipf_a, seed=seed))
    for _ in range(steps):
        trace.add_step({n: r[rng.choice(experts, size=tokens, p=p)] for n, r in zip(names, ranks)})
    return trace


# --- placements ----------------------------------------------------------------------------------

def _check(load, num_devices: int, name: str = "load") -> np.ndarray:
    load = np.asarray(load, np.float64)
    if load.ndim != 1:
        raise ValueError(f"{name} must be one value per expert ([E]), got shape {load.shape}")
    if not isinstance(num_devices, (int, np.integer)) or num_devices < 1:
        raise ValueError(f"num_devices must be a positive int, got {num_devices!r}")
    if load.shape[0] % num_devices:
        raise ValueError(f"{load.shape[0]} experts do not split evenly over {num_devices} devices: the number of "
                         f"devices must divide the number of experts")
    return load


def device_loads(load, perm, num_devices: int) -> np.ndarray:
    """[M] tokens per device: device k holds physical slots [k*E/M, (k+1)*E/M), slot p logical expert perm[p]."""
    load = _check(load, num_devices)
    return load[np.asarray(perm)].reshape(num_devices, -1).sum(1)


def imbalance(load, perm, num_devices: int) -> float:
    """max / mean tokens per device (1.0 = perfect balance; 1.0 for a block without tokens)."""
    loads = device_loads(load, perm, num_devices)
    return float(loads.max() / loads.mean()) if loads.mean() > 0 else 1.0


def coactivation_cost(coactivation, perm, num_devices: int) -> float:
    """Sum over devices of the co-activation counts of every pair of distinct experts sharing it."""
    co = np.asarray(coactivation, np.float64)
    dev = _device_of_logical(perm, num_devices)
    same = dev[:, None] == dev[None, :]
    return float((np.triu(co, 1) * same).sum())


def _device_of_logical(perm, num_devices: int) -> np.ndarray:
    perm = np.asarray(perm)
    dev = np.empty(len(perm), np.int64)
    dev[perm] = np.arange(len(perm)) // (len(perm) // num_devices)
    return dev


def _pack(load, num_devices: int, penalty: np.ndarray | None) -> np.ndarray:
    """Greedy packing -> device of each logical expert [E]: experts in decreasing load, each onto the device
    with a free slot whose cost (load, plus `penalty`[e] summed over the experts already there) is least."""
    e = len(load)
    per = e // num_devices
    dev = np.full(e, -1, np.int64)
    dev_load = np.zeros(num_devices)
    filled = np.zeros(num_devices, np.int64)
    scale = load.sum() / num_devices or 1.0  # the mean device load: the load term's unit
    for x in np.argsort(-load, kind="stable"):
        cost = dev_load / scale
        if penalty is not None:
            cost = cost + np.array([penalty[x, dev == k].sum() for k in range(num_devices)])
        cost[filled >= per] = np.inf
        k = int(np.argmin(cost))
        dev[x], dev_load[k], filled[k] = k, dev_load[k] + load[x], filled[k] + 1
    return dev


def _refine(load, dev, num_devices: int, penalty: np.ndarray | None, max_swaps: int = 10_000) -> np.ndarray:
    """Pairwise swaps of experts on different devices, the best one each time, while one lowers
    sum_k (L_k / mean)^2 + sum over same-device pairs i < j of penalty[i, j]. Counts per device never change."""
    dev = dev.copy()
    scale = load.sum() / num_devices or 1.0
    w = load / scale  # [E] loads in units of the mean device load
    pen = np.zeros((len(load), len(load))) if penalty is None else (penalty + penalty.T) / 2  # symmetric
    np.fill_diagonal(pen, 0.0)
    for _ in range(max_swaps):
        onehot = np.eye(num_devices)[dev]  # [E, M]
        dl = w @ onehot  # [M] device loads
        s = pen @ onehot  # [E, M] penalty of each expert against each device's experts
        la, lb = dl[dev][:, None], dl[dev][None, :]  # [E, 1] load of i's device, [1, E] load of j's device
        delta = w[:, None] - w[None, :]  # [E, E] load moved from i's device to j's when i and j swap
        d_load = 2 * delta * (lb - la) + 2 * delta ** 2
        own = s[np.arange(len(dev)), dev]  # [E] penalty of each expert with its own device
        s_other = s[:, dev]  # [E, E]: penalty of i against j's device
        d_pen = (s_other - own[:, None] - pen) + (s_other.T - own[None, :] - pen)
        gain = np.where(dev[:, None] != dev[None, :], d_load + d_pen, np.inf)  # [E, E]
        i, j = np.unravel_index(np.argmin(gain), gain.shape)
        if not gain[i, j] < -1e-12:
            break
        dev[i], dev[j] = dev[j], dev[i]
    return dev


def _as_perm(dev, num_devices: int) -> np.ndarray:
    """perm [E] from the device of each logical expert: each device's experts in increasing logical id."""
    return np.concatenate([np.flatnonzero(dev == k) for k in range(num_devices)]).astype(np.int64)


def greedy_placement(load, num_devices: int, refine: bool = True) -> np.ndarray:
    """perm [E] balancing `load` [E] over `num_devices` with E / M experts each: heaviest expert first onto
    the least-loaded device that still has a free slot, then (refine) pairwise swaps while they lower the sum
    of squared device loads."""
    load = _check(load, num_devices)
    dev = _pack(load, num_devices, None)
    return _as_perm(_refine(load, dev, num_devices, None) if refine else dev, num_devices)


def anticorrelated_placement(load, coactivation, num_devices: int, weight: float = 1.0,
                             refine: bool = True) -> np.ndarray:
    """perm [E] like `greedy_placement`, also separating experts that fire in the same steps: placing expert
    i next to j costs weight * coactivation[i, j] / S, S = max_i coactivation[i, i] (the steps the busiest
    expert fired in), in units of the mean device load; added to a device's cost when packing, and the swaps
    lower sum_k (L_k / mean)^2 + weight * coactivation_cost / S."""
    load = _check(load, num_devices)
    co = np.asarray(coactivation, np.float64)
    if co.shape != (len(load), len(load)):
        raise ValueError(f"coactivation must be [E, E] = ({len(load)}, {len(load)}), got shape {co.shape}")
    penalty = weight * co / max(np.diag(co).max(), 1.0)  # [E, E]
    np.fill_diagonal(penalty, 0.0)
    dev = _pack(load, num_devices, penalty)
    return _as_perm(_refine(load, dev, num_devices, penalty) if refine else dev, num_devices)


def plan_placement(trace: RoutingTrace, num_devices: int, method: str = "greedy",
                   weight: float = 1.0) -> dict[str, np.ndarray]:
    """Block name -> perm [E] for every block of `trace`."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if trace.num_experts % num_devices:
        raise ValueError(f"{trace.num_experts} experts do not split evenly over {num_devices} devices: the "
                         f"number of devices must divide the number of experts")
    if method == "greedy":
        return {b: greedy_placement(c, num_devices) for b, c in trace.counts.items()}
    return {b: anticorrelated_placement(c, trace.coactivation[b], num_devices, weight)
            for b, c in trace.counts.items()}


# --- applying a placement ------------------------------------------------------------------------

def check_perm(perm, num_experts: int, name: str = "placement") -> np.ndarray:
    perm = np.asarray(perm)
    if perm.shape != (num_experts,) or not np.issubdtype(perm.dtype, np.integer) \
            or not np.array_equal(np.sort(perm), np.arange(num_experts)):
        raise ValueError(f"{name} must be a permutation of 0..{num_experts - 1} (one logical expert per slot), "
                         f"got {perm.tolist()}")
    return perm.astype(np.int64)


def get_placement(model) -> dict[str, np.ndarray]:
    """Block name -> perm [E] of a model's current placement (identity where none is set)."""
    out = {}
    for b in moe_block_names(model.config):
        pol = _experts_module(model, b).phys_of_logical
        e = model.config.num_experts
        out[b] = np.arange(e) if pol is None else np.argsort(np.asarray(pol))
    return out


def _permute_leaf(x, idx: np.ndarray):
    """x[idx] on the leading axis, in x's own sharding (a plain gather would come back replicated). A stack in
    host memory (numpy, or pinned host memory: `experts_on="host"`) is permuted with numpy: no jitted operation
    runs on host memory."""
    sharding = getattr(x, "sharding", None)
    if sharding is None or sharding.memory_kind not in (None, next(iter(x.devices())).default_memory().kind):
        y = np.take(np.asarray(x), idx, axis=0)
        return y if sharding is None else jax.device_put(y, sharding)
    y = jax.tree.map(lambda a: jnp.take(a, jnp.asarray(idx), axis=0), x)
    return jax.device_put(y, sharding)


def _block_of_path(path) -> tuple[str, str] | None:
    """('encoder/1', 'wi') for a pytree path through <stack> blocks <i> experts wi|wo; else None."""
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    for n in range(len(names) - 4):
        stack, blocks, i, experts, w = names[n:n + 5]
        if stack in ("encoder", "decoder") and blocks == "blocks" and experts == "experts" and w in ("wi", "wo"):
            return f"{stack}/{i}", w
    return None


def apply_placement(model, placement: dict[str, np.ndarray], opt_state=None):
    """Moves `model` (in place) from its current placement to `placement` (block -> perm [E]; blocks left
    out keep theirs): permutes each block's wi, wo rows and sets `Experts.phys_of_logical`. `opt_state`, a
    pytree mirroring the params (optimizer moments), gets the same row permutation on every leaf under
    <stack>/blocks/<i>/experts/wi|wo whose leading axis is E; the permuted tree is returned (None if none)."""
    e = model.config.num_experts
    names = moe_block_names(model.config)
    unknown = sorted(set(placement) - set(names))
    if unknown:
        raise ValueError(f"placement names blocks {unknown} that are not MoE blocks of this model; "
                         f"MoE blocks: {names}")
    current = get_placement(model)
    idx = {}
    for b, perm in placement.items():
        perm = check_perm(perm, e, f"placement of block {b!r}")
        old_phys = np.argsort(current[b])  # [E] old physical slot of each logical expert
        idx[b] = old_phys[perm]  # new slot p takes old slot old_phys[perm[p]]
        module = _experts_module(model, b)
        module.wi.set_value(_permute_leaf(module.wi.get_value(), idx[b]))
        module.wo.set_value(_permute_leaf(module.wo.get_value(), idx[b]))
        identity = np.array_equal(perm, np.arange(e))
        module.phys_of_logical = None if identity else tuple(int(p) for p in np.argsort(perm))
    if opt_state is None:
        return None

    def permute(path, leaf):
        hit = _block_of_path(path)
        if hit is None or hit[0] not in idx or not getattr(leaf, "ndim", 0) or leaf.shape[0] != e:
            return leaf
        return _permute_leaf(leaf, idx[hit[0]])

    return jax.tree_util.tree_map_with_path(permute, opt_state)


def placement_to_json(placement: dict[str, np.ndarray], **meta) -> dict:
    return {**meta, "blocks": {b: np.asarray(p).tolist() for b, p in placement.items()}}


def save_placement(model, directory) -> Path | None:
    """Writes the model's placement as `placement.json` in `directory` (a checkpoint folder) if it has one
    other than the identity; returns the file written, or None."""
    placement = {b: p for b, p in get_placement(model).items() if not np.array_equal(p, np.arange(len(p)))}
    if not placement:
        return None
    path = Path(directory) / PLACEMENT_FILE
    path.write_text(json.dumps(placement_to_json(placement, num_experts=model.config.num_experts)))
    return path


def load_placement(path) -> dict[str, np.ndarray]:
    """Block -> perm [E] from a placement JSON ({"blocks": {name: perm}}; `scripts/plan_placement.py`)."""
    d = json.loads(Path(path).read_text())
    if not isinstance(d, dict) or not isinstance(d.get("blocks"), dict):
        raise ValueError(f"{path}: a placement file needs a 'blocks' object (block name -> permutation)")
    return {b: np.asarray(p) for b, p in d["blocks"].items()}


def restore_placement(model, directory):
    """Marks `model`, whose expert stacks were saved in physical order, with the placement stored in
    `directory`/placement.json (no weights move); returns the model. Without the file, nothing changes."""
    path = Path(directory) / PLACEMENT_FILE
    if not path.is_file():
        return model
    e = model.config.num_experts
    names = moe_block_names(model.config)
    for b, perm in load_placement(path).items():
        if b not in names:
            raise ValueError(f"{path}: block {b!r} is not a MoE block of this model; MoE blocks: {names}")
        perm = check_perm(perm, e, f"{path}: placement of block {b!r}")
        identity = np.array_equal(perm, np.arange(e))
        _experts_module(model, b).phys_of_logical = None if identity else tuple(int(p) for p in np.argsort(perm))
    return model


# --- reports -------------------------------------------------------------------------------------

def placement_lower_bound(load, num_devices: int) -> float:
    """A lower bound on max / mean tokens per device over every placement with E / M experts per device: the
    mean, and the heaviest expert plus the E / M - 1 lightest others (its device holds that many more)."""
    load = np.sort(_check(load, num_devices))  # ascending
    mean = load.sum() / num_devices
    if not mean:
        return 1.0
    per = len(load) // num_devices
    return float(max(mean, load[-1] + load[:per - 1].sum()) / mean)


def balance_report(trace: RoutingTrace, placement: dict[str, np.ndarray], num_devices: int) -> dict:
    """Tokens per device before (contiguous: slot p holds expert p) and after `placement`, per block and
    overall. A block's figure is max / mean tokens per device; overall is sum_b max_b / sum_b mean_b (each
    block waits for its busiest device). Also the co-activation cost (`coactivation_cost`) summed over blocks."""
    rows, totals = {}, np.zeros(4)  # totals: max before, max after, mean, tokens
    co = {"before": 0.0, "after": 0.0}
    for b, load in trace.counts.items():
        identity = np.arange(trace.num_experts)
        before, after = device_loads(load, identity, num_devices), device_loads(load, placement[b], num_devices)
        mean = before.mean()
        rows[b] = {"tokens": int(load.sum()), "before": float(before.max() / mean) if mean else 1.0,
                   "after": float(after.max() / mean) if mean else 1.0,
                   "bound": placement_lower_bound(load, num_devices),
                   "devices_before": before.astype(int).tolist(), "devices_after": after.astype(int).tolist()}
        totals += [before.max(), after.max(), mean, load.sum()]
        co["before"] += coactivation_cost(trace.coactivation[b], identity, num_devices)
        co["after"] += coactivation_cost(trace.coactivation[b], placement[b], num_devices)
    overall = {"before": totals[0] / totals[2] if totals[2] else 1.0,
               "after": totals[1] / totals[2] if totals[2] else 1.0}
    return {"num_devices": num_devices, "blocks": rows, "overall": overall, "coactivation_cost": co}
