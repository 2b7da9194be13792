"""The engine on a device mesh: each device streams its own experts, tokens stay where their rows are.

On a mesh with axes `data` and `expert` (`pregated_jax.mesh`), the engine places the model so that:

- the expert stacks [E, ...] are split on E over `expert` (device j of that axis holds experts
  j*E_loc .. (j+1)*E_loc - 1, E_loc = E / expert) and replicated over `data`, in host memory (in device memory
  for gpu-only);
- every other weight is replicated;
- a request's rows are split over `data` and replicated over `expert`.

Each prefill and each fused decode dispatch is one `jax.shard_map` over the mesh whose body is the
single-device engine's own code (`StackPass`, the schedules, `fetch`, `cache`), run by every device on its
rows and its share of the experts. A device sees a routing decision through `local_decision`: the tokens
routed to its own experts, renumbered 0..E_loc-1, the others dropped. So a device copies only its own
experts (pre-gated prefetch, on-demand, whole blocks, streaming), its cache (Huang et al.'s expert buffering)
holds only its own experts, and its MoE output holds its experts' tokens and zeros elsewhere; the devices of
an `expert` group sum their outputs (`ExpertSlots.sum_over`), which adds each token's one non-zero
contribution to exact zeros: the tokens equal the single-device engine's.

The tokens do not travel to their expert (the training layer's all-to-all): every device of an `expert` group
holds the group's rows, computes the non-expert layers on all of them, and an all-reduce of the MoE outputs
([rows, len, d] per MoE block) combines the experts. In decoding, rows x d is a few kB per block, the size of
an all-to-all of the same tokens.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pregated_jax.engine.placement import Memories
from pregated_jax.model import host_memory_kind
from pregated_jax.routing import RouterDecision

DATA, EXPERT = "data", "expert"
DEVICES = (DATA, EXPERT)  # a per-device value's leading axis: one entry per device of the mesh


@dataclasses.dataclass(frozen=True)
class MeshLayout:
    """Where the engine's arrays live on `mesh`, and the per-device view of routing."""

    mesh: Mesh
    num_experts: int  # E of the model

    def __post_init__(self):
        missing = [a for a in DEVICES if a not in self.mesh.axis_names]
        if missing:
            raise ValueError(f"the engine's mesh needs axes {DEVICES} (pregated_jax.make_mesh), has "
                             f"{self.mesh.axis_names}")
        if self.num_experts % self.expert:
            raise ValueError(f"{self.num_experts} experts do not split over the mesh axis expert={self.expert}")

    @property
    def data(self) -> int:
        return self.mesh.shape[DATA]

    @property
    def expert(self) -> int:
        return self.mesh.shape[EXPERT]

    @property
    def local_experts(self) -> int:
        return self.num_experts // self.expert

    @property
    def first_device(self) -> jax.Device:
        return self.mesh.devices.flat[0]

    # --- placement, before any call -----------------------------------------------------------------
    def placement(self, experts_resident: bool) -> Memories:
        """Shardings the weights are placed with: replicated, and the expert stacks split on E over `expert`
        in host memory (in device memory when `experts_resident`, gpu-only)."""
        device = self.first_device
        kind = device.default_memory().kind if experts_resident else host_memory_kind(device)
        return Memories(device, NamedSharding(self.mesh, P()), NamedSharding(self.mesh, P(EXPERT), memory_kind=kind))

    def traced(self, experts_resident: bool) -> Memories:
        """Where copies land inside the per-device body (`shard_map`): the device's own memories."""
        host = jax.memory.Space.Device if experts_resident else jax.memory.Space.Host
        return Memories(self.first_device, jax.memory.Space.Device, host)

    def rows(self) -> NamedSharding:
        """A request's rows [B, ...]: split over `data`, replicated over `expert`."""
        return NamedSharding(self.mesh, P(DATA))

    def padded_batch(self, batch: int) -> int:
        """The batch rounded up to a multiple of `data` (every data group gets as many rows)."""
        return -(-batch // self.data) * self.data

    # --- inside the per-device body -----------------------------------------------------------------
    def local_decision(self, decision: RouterDecision, phys_of_logical=None) -> RouterDecision:
        """This device's view of a decision over all E experts: tokens routed to its own experts, with ids
        local to its share (0..E_loc-1); every other token dropped (keep False).

        phys_of_logical [E] int32: the stack row of each logical expert under a load-balanced placement (row p on
        device p // E_loc); None: row e holds expert e."""
        e_loc = self.local_experts
        first = jax.lax.axis_index(EXPERT) * e_loc
        index = decision.expert_index  # [B, S] logical ids
        logits = decision.logits  # [B, S, E] logical order
        if phys_of_logical is not None:
            index = phys_of_logical[index]
            logits = jnp.take(logits, jnp.argsort(phys_of_logical), axis=-1)  # physical order
        index = index - first
        mine = (index >= 0) & (index < e_loc)
        return RouterDecision(jnp.where(mine, index, 0).astype(jnp.int32), decision.combine_weight,
                              decision.keep & mine, jax.lax.dynamic_slice_in_dim(logits, first, e_loc, axis=-1))

    def all_devices(self, x):
        """Sums a per-device count over the mesh (inside the body)."""
        return jax.lax.psum(x, DEVICES)

    def over_data(self, tree):
        """Sums counts over `data` (inside the body): every device of an `expert` group counted the same group's
        tokens, so this is the mesh's total once."""
        return jax.tree.map(lambda x: jax.lax.psum(x, DATA), tree)

    def any_device(self, flag):
        """Whether `flag` holds on any device (inside the body)."""
        return jax.lax.psum(jnp.asarray(flag, jnp.int32), DEVICES) > 0


def spec_of(leaf) -> P:
    """The PartitionSpec a placed weight has (replicated for anything not placed with a NamedSharding)."""
    sharding = getattr(leaf, "sharding", None)
    return sharding.spec if isinstance(sharding, NamedSharding) else P()


def per_device(tree):
    """Inside the body: per-device state -> a leading axis of one, so that the mesh sees [devices, ...]."""
    return jax.tree.map(lambda a: a[None], tree)


def this_device(tree):
    """Inside the body: the device's own entry of per-device state [1, ...] -> [...]."""
    return jax.tree.map(lambda a: a[0], tree)


def pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
    """a [B, ...] -> [rows, ...], repeating the last row (rows added for an even split are dropped after)."""
    if a.shape[0] == rows:
        return a
    return np.concatenate([a, np.repeat(a[-1:], rows - a.shape[0], axis=0)])
