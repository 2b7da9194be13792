"""The expert layer: consumes a `RouterDecision` and applies top-1 experts with dropless dispatch.

Dispatch follows Huang et al.'s dynamic gating: sort tokens by expert, count tokens per expert, and run
one grouped matmul (`jax.lax.ragged_dot`) over the real tokens only; nothing is padded. Capacity-dropped
tokens are sorted past the last group, so no expert computes them, and they get zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from pregated_jax.config import SwitchConfig
from pregated_jax.layers import compute_dtype, dense_init
from pregated_jax.quant import QuantizedExperts, dequantize
from pregated_jax.routing import RouterDecision

Array = jax.Array


class Experts(nnx.Module):
    """E ReLU FFN experts with stacked weights wi [E, d, ff], wo [E, ff, d]."""

    def __init__(self, config: SwitchConfig, *, rngs: nnx.Rngs):
        e, d, ff = config.num_experts, config.d_model, config.d_ff
        self.wi = nnx.Param(dense_init(d ** -0.5)(rngs.params(), (e, d, ff)))
        self.wo = nnx.Param(dense_init(ff ** -0.5)(rngs.params(), (e, ff, d)))
        self.dtype = compute_dtype(config)
        self.dropout = nnx.Dropout(config.dropout_rate, rngs=rngs)
        # `pregated_jax.expert_parallel.ExpertParallel` once the model is placed on a mesh of several devices
        # (`shard_model`); None: single-device dispatch.
        self.expert_parallel = None
        # `pregated_jax.expert_placement`: the physical row of wi/wo holding each logical expert (a tuple of E
        # ints), so that a placement can reorder the stacks over devices with the router unchanged; None: row e
        # holds expert e.
        self.phys_of_logical = None

    def logical_weights(self):
        """(wi [E, d, ff], wo [E, ff, d]) with row e holding logical expert e, whatever the placement."""
        wi, wo = self.wi[...], self.wo[...]
        if self.phys_of_logical is None:
            return wi, wo
        rows = np.asarray(self.phys_of_logical)  # [E]

        def take(a):  # host data (numpy, or a jax array outside device memory) is gathered with numpy
            on_device = isinstance(a, jax.Array) and a.sharding.memory_kind in (
                None, next(iter(a.devices())).default_memory().kind)
            return a[jnp.asarray(rows)] if on_device else np.asarray(a)[rows]

        return jax.tree.map(take, wi), jax.tree.map(take, wo)

    def __call__(self, x: Array, decision: RouterDecision, slots: "ExpertSlots | None" = None) -> Array:
        """x [B, S, d] -> combine_weight * expert(x) where kept, else 0; [B, S, d].

        `slots` replaces the stored weights (the inference engine passes device-resident copies, whose
        `expert_ids` are logical).
        """
        if slots is None and self.phys_of_logical is not None:  # logical expert ids -> physical rows
            rows = jnp.asarray(self.phys_of_logical, jnp.int32)  # [E]
            decision = decision.replace(expert_index=rows[decision.expert_index])
        if slots is None and self.expert_parallel is not None:
            return self.expert_parallel(x, decision, self.wi[...], self.wo[...], self.dtype, self.dropout)
        if slots is None:
            return apply_experts(x, decision, self.wi[...], self.wo[...], self.dtype, self.dropout)
        y = apply_experts(x, decision, slots.wi, slots.wo, self.dtype, self.dropout, slots.expert_ids)
        return y if slots.sum_over is None else jax.lax.psum(y, slots.sum_over)


@struct.dataclass
class ExpertSlots:
    """A table of G expert weights and which expert each slot holds (-1: empty slot). Weights are plain
    arrays or `QuantizedExperts` (every leaf stacked on G)."""

    wi: Array | QuantizedExperts  # [G, d, ff]
    wo: Array | QuantizedExperts  # [G, ff, d]
    expert_ids: Array  # [G] int32
    # A mesh axis (inside `jax.shard_map`) whose devices each hold a share of the experts: the table holds this
    # device's share, and the devices' outputs are summed over the axis (`pregated_jax.engine.mesh_layout`).
    sum_over: str | None = struct.field(pytree_node=False, default=None)


def apply_experts(x: Array, decision: RouterDecision, wi: Array | QuantizedExperts, wo: Array | QuantizedExperts,
                  dtype, dropout=None, expert_ids: Array | None = None) -> Array:
    """Dropless top-1 expert computation.

    x [B, S, d]; wi [G, d, ff], wo [G, ff, d] hold G expert weights, plain or quantized (dequantized to
    `dtype` here, on the device, right before the grouped matmuls). By default G = E and group g is
    expert g; with `expert_ids` [G] (int), group g holds expert `expert_ids[g]` — the engine's slot
    table — and tokens whose expert is in no slot contribute 0 (so partial tables can be summed).
    """
    b, s, d = x.shape
    num_groups = jax.tree.leaves(wi)[0].shape[0]
    if expert_ids is None and b * s <= num_groups // 2:
        # Few tokens, many experts (decoding with every expert resident): gather the distinct experts into
        # T slots and run the grouped matmul over those. A grouped matmul over all E groups reads every
        # expert; per-token weight gathers read duplicates and are slower (docs/design.md, "gpu-only: distinct
        # experts into slots").
        ids = jnp.unique(decision.expert_index.reshape(-1), size=b * s, fill_value=-1)  # [T]: distinct, then -1
        take = jnp.maximum(ids, 0)  # empty slots hold expert 0; no token maps to them
        return apply_experts(x, decision, wi[take], wo[take], dtype, dropout, ids)
    tokens = x.reshape(b * s, d).astype(dtype)  # [T, d]
    if expert_ids is None:
        group = decision.expert_index.reshape(-1)  # [T]
    else:
        # group of each token = position of its expert in the slot table
        match = decision.expert_index.reshape(-1, 1) == expert_ids[None, :]  # [T, G]
        group = jnp.argmax(match, axis=-1).astype(jnp.int32)
    keep = decision.keep.reshape(-1)
    if expert_ids is not None:
        keep = keep & jnp.any(match, axis=-1)
    sort_key = jnp.where(keep, group, num_groups)  # dropped tokens sort past the last group
    order = jnp.argsort(sort_key, stable=True)  # [T]
    group_sizes = jnp.bincount(sort_key, length=num_groups + 1)[:num_groups].astype(jnp.int32)  # [G]
    h = jax.lax.ragged_dot(tokens[order], dequantize(wi, dtype), group_sizes)  # [T, ff]
    h = jax.nn.relu(h)
    if dropout is not None:
        h = dropout(h)
    y = jax.lax.ragged_dot(h, dequantize(wo, dtype), group_sizes)  # [T, d]; dropped rows are 0
    y = jnp.zeros_like(y).at[order].set(y)  # back to token order
    weight = jnp.where(keep, decision.combine_weight.reshape(-1), 0.0).astype(dtype)  # [T]
    return (y * weight[:, None]).reshape(b, s, d)
