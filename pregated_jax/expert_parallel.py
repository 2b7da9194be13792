"""The expert-parallel MoE layer: experts split on E over the mesh axis `expert`, tokens over `data` x `expert`.

`shard_model(model, mesh)` places a model on a mesh (see `pregated_jax.mesh`): every expert stack
wi [E, d, ff] / wo [E, ff, d] is split on E over `expert` (device i of that axis holds experts
i*E_loc .. (i+1)*E_loc - 1, E_loc = E / expert), everything else is replicated, and each `Experts` module
dispatches through `ExpertParallel`. The router, the router losses and capacity stay outside the layer: they
see the global batch, so z-loss, load-balancing loss and capacity drops are those of the single-device model,
and a pre-gated block's decision reaches the next block's dispatch as a plain value.

Inside `jax.shard_map`, each device holds T_loc = T / (data * expert) tokens. Dispatch is dropless, as in
`pregated_jax.moe.apply_experts` (Huang et al.'s dynamic gating): sort the local tokens by expert (capacity
drops last), count them per expert; an all-gather of the counts over `expert` gives the matrix M[src, dst] of
tokens each device sends each other device; the tokens travel to their expert's device, are regrouped by
local expert, run through one `ragged_dot` per weight, and travel back (MaxText's `ra2a_and_route`).

The transport is `jax.lax.ragged_all_to_all` where XLA implements it (GPU, TPU): it moves only the routed
rows. XLA:CPU lacks it; there `dense_ragged_all_to_all`, a drop-in with the same signature built on
`lax.all_to_all`, moves every device's worst case (T_loc rows to each peer) and gives the same result.
Both share all the local computation (`_dispatch_and_compute`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pregated_jax.moe import Experts
from pregated_jax.routing import RouterDecision

Array = jax.Array
Collective = Literal["auto", "ragged", "dense"]

TOKENS = ("data", "expert")  # mesh axes the token dimension is split over
EXPERT = "expert"


def default_collective(mesh: Mesh) -> str:
    """"ragged" where XLA implements ragged-all-to-all (GPU, TPU), "dense" elsewhere (the CPU)."""
    return "dense" if mesh.devices.flat[0].platform == "cpu" else "ragged"


def dense_ragged_all_to_all(operand: Array, output: Array, input_offsets: Array, send_sizes: Array,
                            output_offsets: Array, recv_sizes: Array, *, axis_name: str, chunk: int) -> Array:
    """`jax.lax.ragged_all_to_all`'s result, through a dense `lax.all_to_all` (for backends without it).

    operand [N, ...]; output [M, ...]; the four offset/size arrays [n] (n = axis size, one slice per peer).
    Every slice is padded to `chunk` rows (an upper bound on any send size), so each device sends n * chunk
    rows: exact, but it moves more data than the ragged collective.
    """
    n = input_offsets.shape[0]
    rows = jnp.arange(chunk)  # [chunk]
    src = input_offsets[:, None] + rows[None, :]  # [n, chunk] rows of operand sent to each peer
    valid = rows[None, :] < send_sizes[:, None]  # [n, chunk]
    packed = jnp.take(operand, jnp.clip(src, 0, operand.shape[0] - 1), axis=0)  # [n, chunk, ...]
    packed = jnp.where(valid.reshape(valid.shape + (1,) * (operand.ndim - 1)), packed, 0)
    got = jax.lax.all_to_all(packed.reshape((n * chunk,) + operand.shape[1:]), axis_name, 0, 0,
                             tiled=True)  # [n * chunk, ...]: peer i's slice for this device at i * chunk
    where = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)  # [n]: peer i's offset here
    dst = where[:, None] + rows[None, :]  # [n, chunk]
    dst = jnp.where(rows[None, :] < recv_sizes[:, None], dst, output.shape[0])  # padding: out of range
    return output.at[dst.reshape(-1)].set(got, mode="drop")


def _exclusive_cumsum(x: Array, axis: int = 0) -> Array:
    return jnp.cumsum(x, axis=axis) - x


def _dispatch_and_compute(tokens: Array, index: Array, keep: Array, weight: Array, wi: Array, wo: Array,
                          dropout_key: Array | None, *, all_to_all: Callable, ep: int, dropout_rate: float) -> Array:
    """One device's share of the layer, inside shard_map over (data, expert).

    tokens [T, d] (this device's T = T_loc tokens); index [T] int32 expert; keep [T] bool; weight [T]
    combine weight (0 where dropped); wi [E_loc, d, ff], wo [E_loc, ff, d] this device's experts.
    -> [T, d]: weight * expert(token), 0 for dropped tokens.
    """
    t, d = tokens.shape
    e_loc = wi.shape[0]
    e = e_loc * ep
    me = jax.lax.axis_index(EXPERT)
    sort_key = jnp.where(keep, index, e)  # [T]: dropped tokens sort past the last expert
    order = jnp.argsort(sort_key, stable=True)  # [T]: grouped by expert, so by destination device
    counts = jnp.bincount(sort_key, length=e + 1)[:e].astype(jnp.int32)  # [E] tokens per expert
    counts_all = jax.lax.all_gather(counts, EXPERT)  # [ep, E]: source device i's counts
    m = counts_all.reshape(ep, ep, e_loc).sum(-1)  # [ep src, ep dst] tokens src sends to dst
    send, recv = m[me], m[:, me]  # [ep], [ep]
    send_offsets = _exclusive_cumsum(send)  # [ep] where each destination's rows start in `order`
    land_offsets = _exclusive_cumsum(m, 0)[me]  # [ep] where this device's rows start on each destination
    recv_offsets = _exclusive_cumsum(recv)  # [ep] where each source's rows start here
    back_offsets = _exclusive_cumsum(m, 1)[:, me]  # [ep] where each source's rows started on the source

    buffer = ep * t  # worst case: every peer sends all its tokens here (top-1: nothing is dropped)
    received = all_to_all(tokens[order], jnp.zeros((buffer, d), tokens.dtype), send_offsets, send,
                          land_offsets, recv)  # [ep * T, d]: by source, each source's rows by local expert
    # Regroup the received rows by local expert: row r belongs to local expert g of source i.
    per_source = jax.lax.dynamic_slice_in_dim(counts_all, me * e_loc, e_loc, axis=1)  # [ep, E_loc]
    group_sizes = per_source.sum(0)  # [E_loc]
    total = group_sizes.sum()
    filled = jnp.arange(buffer) < total  # [ep * T] rows holding a token
    row_group = jnp.repeat(jnp.tile(jnp.arange(e_loc, dtype=jnp.int32), ep), per_source.reshape(-1),
                           total_repeat_length=buffer)  # [ep * T]
    local_order = jnp.argsort(jnp.where(filled, row_group, e_loc), stable=True)  # [ep * T]
    h = jax.lax.ragged_dot(received[local_order], wi, group_sizes)  # [ep * T, ff]
    h = jax.nn.relu(h)
    if dropout_key is not None:
        key = jax.random.fold_in(dropout_key, jax.lax.axis_index(TOKENS))
        mask = jax.random.bernoulli(key, 1.0 - dropout_rate, h.shape)  # [ep * T, ff]
        h = jnp.where(mask, h / (1.0 - dropout_rate), 0.0).astype(h.dtype)
    y = jax.lax.ragged_dot(h, wo, group_sizes)  # [ep * T, d]; rows past `total` are not promised to be 0
    y = jnp.where(filled[:, None], y, 0.0)
    y = jnp.zeros_like(y).at[local_order].set(y)  # back to the received (source-major) layout
    back = all_to_all(y, jnp.zeros((t, d), y.dtype), recv_offsets, recv, back_offsets, send)  # [T, d] sorted
    out = jnp.zeros_like(back).at[order].set(back)  # [T, d] token order; dropped tokens 0
    return out * weight[:, None]


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
    """Expert-parallel dispatch over `mesh` for one `Experts` module (set by `shard_model`).

    collective: "ragged" (`jax.lax.ragged_all_to_all`), "dense" (`dense_ragged_all_to_all`), or "auto"
    (`default_collective`: ragged on GPU/TPU, dense on the CPU).
    """

    mesh: Mesh
    collective: Collective = "auto"

    def __post_init__(self):
        if self.collective not in ("auto", "ragged", "dense"):
            raise ValueError(f"collective must be 'auto', 'ragged' or 'dense', got {self.collective!r}")
        missing = [a for a in TOKENS if a not in self.mesh.axis_names]
        if missing:
            raise ValueError(f"the mesh needs axes {TOKENS}, has {self.mesh.axis_names}")

    def __call__(self, x: Array, decision: RouterDecision, wi: Array, wo: Array, dtype,
                 dropout: nnx.Dropout | None = None) -> Array:
        """x [B, S, d], decision over [B, S], wi [E, d, ff], wo [E, ff, d] -> [B, S, d], as `apply_experts`."""
        b, s, d = x.shape
        e = wi.shape[0]
        ep = self.mesh.shape[EXPERT]
        if e % ep:
            raise ValueError(f"{e} experts do not split over the mesh axis expert={ep}")
        collective = default_collective(self.mesh) if self.collective == "auto" else self.collective
        n = self.mesh.size
        t = b * s
        pad = -t % n  # tokens added so that every device holds as many; they are dropped (keep False)
        tokens = jnp.pad(x.reshape(t, d).astype(dtype), ((0, pad), (0, 0)))  # [T, d]
        index = jnp.pad(decision.expert_index.reshape(t), (0, pad))  # [T]
        keep = jnp.pad(decision.keep.reshape(t), (0, pad))  # [T]
        weight = jnp.where(keep, jnp.pad(decision.combine_weight.reshape(t), (0, pad)), 0.0).astype(dtype)  # [T]
        rate = 0.0 if dropout is None or dropout.deterministic else dropout.rate
        key = _dropout_key(dropout) if rate > 0 else None
        t_loc = (t + pad) // n
        if collective == "ragged":
            a2a = functools.partial(jax.lax.ragged_all_to_all, axis_name=EXPERT)
        else:
            a2a = functools.partial(dense_ragged_all_to_all, axis_name=EXPERT, chunk=t_loc)
        local = functools.partial(_dispatch_and_compute, all_to_all=a2a, ep=ep, dropout_rate=rate)
        tok, experts = P(TOKENS), P(EXPERT)
        args = [tokens, index, keep, weight, wi.astype(dtype), wo.astype(dtype)]
        specs = [P(TOKENS, None), tok, tok, tok, experts, experts]
        if key is None:
            fn = lambda *a: local(*a, None)  # noqa: E731
        else:
            fn, args, specs = local, args + [key], specs + [P()]
        y = jax.shard_map(fn, mesh=self.mesh, in_specs=tuple(specs), out_specs=P(TOKENS, None))(*args)  # [T, d]
        return y[:t].reshape(b, s, d)


def _dropout_key(dropout: nnx.Dropout) -> Array:
    """A fresh key from the dropout module's RNG stream (as `nnx.Dropout` draws one)."""
    rngs = dropout.rngs
    if isinstance(rngs, nnx.Rngs):
        return rngs[dropout.rng_collection]()
    if isinstance(rngs, nnx.RngStream):
        return rngs()
    raise ValueError("dropout is active but its module holds no RNG stream")


def expert_param_spec(path: tuple) -> P:
    """PartitionSpec of a model param by its path: expert stacks split on E over `expert`, others replicated."""
    return P(EXPERT) if len(path) >= 2 and path[-2] == "experts" and path[-1] in ("wi", "wo") else P()


def expert_state_shardings(tree, mesh: Mesh):
    """NamedShardings for a pytree that mirrors the model's params (the params themselves, optimizer moments;
    arrays or shape structs): a leaf under an `experts` `wi`/`wo` path whose leading axis divides by the
    `expert` axis (E, kept by every per-expert moment) is split over `expert`, every other leaf replicated."""
    ep = mesh.shape[EXPERT]

    def sharding(path, leaf):
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        under = any(a == "experts" and b in ("wi", "wo") for a, b in zip(names, names[1:]))
        split = under and len(leaf.shape) >= 1 and leaf.shape[0] % ep == 0
        return NamedSharding(mesh, P(EXPERT) if split else P())

    return jax.tree_util.tree_map_with_path(sharding, tree)


def shard_model(model: nnx.Module, mesh: Mesh, collective: Collective = "auto") -> nnx.Module:
    """Places `model` on `mesh` in place and returns it: expert stacks split over `expert`, the rest
    replicated; its `Experts` modules dispatch through `ExpertParallel`. A one-device mesh only moves the
    arrays: the model keeps the single-device code path (bit-identical outputs).

    Inputs may be given with any sharding; split the batch over ("data", "expert") (`batch_sharding`) so
    that each device computes its own rows outside the MoE layers.
    """
    parallel = None if mesh.size == 1 else ExpertParallel(mesh, collective)
    experts = [m for _, m in model.iter_modules() if isinstance(m, Experts)]
    for module in experts:
        e = module.wi.get_value().shape[0]
        if e % mesh.shape[EXPERT]:
            raise ValueError(f"{e} experts do not split over the mesh axis expert={mesh.shape[EXPERT]}")
    for module in experts:
        module.expert_parallel = parallel
    from pregated_jax.distributed import put_global  # several processes: each keeps its devices' pieces
    placed = [(path, var.replace(put_global(var.get_value(), NamedSharding(mesh, expert_param_spec(path)))))
              for path, var in nnx.to_flat_state(nnx.state(model))]
    nnx.update(model, nnx.from_flat_state(placed))
    return model


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of an array held whole by every device of the mesh."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch-major array [B, ...]: rows split over ("data", "expert")."""
    return NamedSharding(mesh, P(TOKENS))
