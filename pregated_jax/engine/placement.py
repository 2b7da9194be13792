"""Where weights live: expert stacks in host memory, everything else on the device, per-block programs.

Every block is split once into (graphdef, non-expert state on the device, expert weights in host
memory). The jitted phase functions below merge a block from its graphdef and state at trace time only,
so each dispatch flattens just that block's small state.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import SingleDeviceSharding

from pregated_jax.memory import put_on_host
from pregated_jax.model import (Block, CrossKV, SwitchTransformer, host_memory_kind, lm_logits,
                                 self_attention_bias)
from pregated_jax.moe import ExpertSlots
from pregated_jax.native import HostStack
from pregated_jax.quant import DEFAULT_GROUP_SIZE, QuantizedExperts, as_format
from pregated_jax.routing import decide

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Memories:
    """The device and the two shardings the engine moves weights between."""

    device: jax.Device
    on_device: SingleDeviceSharding
    on_host: SingleDeviceSharding

    @classmethod
    def for_device(cls, device: jax.Device | None = None) -> "Memories":
        device = device or jax.devices()[0]
        host = host_memory_kind(device)
        return cls(device, SingleDeviceSharding(device, memory_kind=device.default_memory().kind),
                   SingleDeviceSharding(device, memory_kind=host))


class Static:
    """A graphdef as a static jit argument whose hash is computed once.

    jit hashes static arguments on every call, and hashing an nnx GraphDef walks the whole module tree
    (0.08-0.15 ms per call on a CPU): a prefill dispatches dozens of block functions.
    """

    __slots__ = ("value", "_hash")

    def __init__(self, value):
        self.value, self._hash = value, hash(value)

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return self is other or (isinstance(other, Static) and self._hash == other._hash and self.value == other.value)


def _is_expert_weight(path, _value) -> bool:
    return len(path) >= 2 and path[-2] == "experts" and path[-1] in ("wi", "wo")


def _in_host_memory(w, mem: Memories) -> bool:
    """Whether every leaf of an expert stack is host data: numpy, or a jax array outside the device's own
    memory (pinned host memory: a model loaded with `experts_on="host"`)."""
    return all(isinstance(a, np.ndarray) or (isinstance(a, jax.Array)
                                             and a.sharding.memory_kind != mem.on_device.memory_kind)
               for a in jax.tree.leaves(w))


def place_experts(w, mem: Memories, expert_dtype: str, group_size: int, dtype, name: str):
    """An expert stack in the engine's format (`quant.as_format`), placed at `mem.on_host` (the device's memory
    in gpu-only mode).

    A stack on the host (numpy, or loaded with `experts_on="host"`) never goes through device memory as a
    whole: one already at `mem.on_host` in the engine's format is kept as it is (no copy); otherwise it is read
    into numpy and cast there (a quantization runs on the device a few experts at a time, `quant.quantize`),
    then put at `mem.on_host`. No jitted operation runs on a stack in host memory. A stack on the device is
    converted there and copied out."""
    if not _in_host_memory(w, mem):
        return put_on_host(as_format(w, expert_dtype, group_size, dtype, name), mem.on_host, name)
    in_place = all(isinstance(a, jax.Array) and a.sharding == mem.on_host for a in jax.tree.leaves(w))
    if in_place and isinstance(w, QuantizedExperts):
        return as_format(w, expert_dtype, group_size, dtype, name)  # checks the stored format; no copy
    if in_place and expert_dtype == "bfloat16" and w.dtype == dtype:
        return w
    w = jax.tree.map(np.asarray, w)
    return put_on_host(as_format(w, expert_dtype, group_size, dtype, name), mem.on_host, name)


@struct.dataclass
class BlockProgram:
    """One block, split for the engine: graphdef, device state, and (MoE blocks) host expert stacks.

    A pytree (graphdef and flags static), so a whole program can be an argument of one jitted step.
    """

    graphdef: Static = struct.field(pytree_node=False)  # Static(nnx.GraphDef)
    state: nnx.State  # non-expert weights and RNG state, on the device
    placeholder: nnx.State  # tiny stand-ins for the expert weights (they travel separately)
    is_sparse: bool = struct.field(pytree_node=False)
    host_wi: Array | QuantizedExperts | None = None  # [E, d, ff] in host memory, in the engine's expert format
    host_wo: Array | QuantizedExperts | None = None  # [E, ff, d]
    router_classifier: Array | None = None  # [d, E] own gate, on the device (speculative prediction)
    # one per leaf of (host_wi, host_wo), in `jax.tree.leaves` order
    host_stacks: tuple[HostStack, ...] | None = struct.field(pytree_node=False, default=None)
    # [E] int32, the row of host_wi/host_wo holding each logical expert, when the stacks keep a load-balanced
    # placement's physical order (`pregated_jax.expert_placement`; on a mesh, row p is on device p // E_loc);
    # None: row e holds logical expert e
    phys_of_logical: Array | None = None

    @classmethod
    def from_block(cls, block: Block, mem: Memories, dtype, expert_dtype: str = "bfloat16",
                   group_size: int = DEFAULT_GROUP_SIZE, physical: bool = False) -> "BlockProgram":
        """physical: keep the expert stacks in the model's placement order (a mesh: the placement decides which
        device holds which expert) instead of the logical order."""
        graphdef, experts, rest = nnx.split(block, _is_expert_weight, ...)
        rest = jax.device_put(rest, mem.on_device)
        placeholder = jax.tree.map(lambda _: jnp.zeros((0,), dtype), experts)
        graphdef = Static(graphdef)
        if not block.is_sparse:
            return cls(graphdef, rest, placeholder, False)
        put = lambda a, where: jax.device_put(a, where)  # noqa: E731
        router = None if block.router is None else put(block.router.classifier[...], mem.on_device)
        phys = block.experts.phys_of_logical
        if physical and phys is not None:
            wi, wo = block.experts.wi[...], block.experts.wo[...]
            phys = put(np.asarray(phys, np.int32), mem.on_device)
        else:
            wi, wo = block.experts.logical_weights()  # the engine indexes experts by the router's (logical) ids
            phys = None
        host_wi = place_experts(wi, mem, expert_dtype, group_size, dtype, "experts.wi")
        host_wo = place_experts(wo, mem, expert_dtype, group_size, dtype, "experts.wo")
        # addresses for the native copies, every leaf (not in gpu-only mode, whose stacks are on the device);
        # this program keeps the arrays alive
        leaves = jax.tree.leaves((host_wi, host_wo))
        stacks = tuple(HostStack.of(a) for a in leaves) if HostStack.readable(leaves[0]) else None
        return cls(graphdef, rest, placeholder, True, host_wi, host_wo, router, stacks, phys)

    @property
    def num_experts(self) -> int:
        return self.host_wi.shape[0]

    @property
    def expert_format(self) -> str:
        """The experts' format in host memory: a quantized format's name, else the stack's dtype."""
        return self.host_wi.format if isinstance(self.host_wi, QuantizedExperts) else str(self.host_wi.dtype)

    @property
    def expert_bytes(self) -> int:
        """Bytes one expert takes in host memory and in a copy: every leaf's row (values and scales)."""
        return sum(a.nbytes // a.shape[0] for a in jax.tree.leaves((self.host_wi, self.host_wo)))

    def attend_and_route(self, x, bias, decision=None, cross=None, cross_bias=None, cache=None,
                         cache_index=None):
        """-> (x, h, decision, next_decision, cache); see `Block.attend_and_route`."""
        return _attend_and_route(self.graphdef, self.state, self.placeholder, x, bias, decision, cross,
                                 cross_bias, cache, cache_index)

    def ffn_output(self, x, h, decision, slots: ExpertSlots | None):
        return _ffn_output(self.graphdef, self.state, self.placeholder, x, h, decision, slots)


@functools.partial(jax.jit, static_argnums=0)
def _attend_and_route(graphdef, state, placeholder, x, bias, decision, cross, cross_bias, cache, cache_index):
    block = nnx.merge(graphdef.value, placeholder, state)
    return block.attend_and_route(x, bias, decision=decision, cross=cross, cross_bias=cross_bias,
                                  cache=cache, cache_index=cache_index)


@functools.partial(jax.jit, static_argnums=0)
def _ffn_output(graphdef, state, placeholder, x, h, decision, slots):
    block = nnx.merge(graphdef.value, placeholder, state)
    return block.ffn_output(x, h, decision, slots)


@functools.partial(jax.jit, static_argnums=2)
def predict_decision(classifier: Array, h: Array, capacity: int | None):
    """Applies a gate [d, E] to h [B, S, d]: the speculative prediction of a block's routing."""
    return decide(h.astype(jnp.float32) @ classifier, capacity)


@struct.dataclass
class StackProgram:
    """A stack's position bias, final norm and block programs."""

    bias_graphdef: Static = struct.field(pytree_node=False)
    bias_state: nnx.State
    norm_graphdef: Static = struct.field(pytree_node=False)
    norm_state: nnx.State
    blocks: list[BlockProgram]
    kind: str = struct.field(pytree_node=False)

    @classmethod
    def from_stack(cls, stack, mem: Memories, dtype, expert_dtype: str = "bfloat16",
                   group_size: int = DEFAULT_GROUP_SIZE, physical: bool = False) -> "StackProgram":
        bias_gd, bias_state = nnx.split(stack.relative_bias)
        norm_gd, norm_state = nnx.split(stack.final_norm)
        blocks = [BlockProgram.from_block(b, mem, dtype, expert_dtype, group_size, physical) for b in stack.blocks]
        return cls(Static(bias_gd), jax.device_put(bias_state, mem.on_device), Static(norm_gd),
                   jax.device_put(norm_state, mem.on_device), blocks, stack.kind)

    @property
    def moe_blocks(self) -> list[int]:
        return [i for i, b in enumerate(self.blocks) if b.is_sparse]

    def self_bias(self, query_positions, key_positions, key_mask):
        return _self_bias(self.bias_graphdef, self.bias_state, self.kind, query_positions, key_positions,
                          key_mask)

    def final_norm(self, x):
        return _final_norm(self.norm_graphdef, self.norm_state, x)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _self_bias(graphdef, state, kind, query_positions, key_positions, key_mask):
    return self_attention_bias(nnx.merge(graphdef.value, state), kind, query_positions, key_positions, key_mask)


@functools.partial(jax.jit, static_argnums=0)
def _final_norm(graphdef, state, x):
    return nnx.merge(graphdef.value, state)(x)


@struct.dataclass
class ModelProgram:
    """The whole model split for offloaded inference."""

    config: object = struct.field(pytree_node=False)
    shared: Array  # [V, d] embedding (tied LM head), on the device
    lm_head: Array | None  # [d, V] when untied
    encoder: StackProgram
    decoder: StackProgram
    mem: Memories = struct.field(pytree_node=False)

    @classmethod
    def from_model(cls, model: SwitchTransformer, mem: Memories | None = None, expert_dtype: str = "bfloat16",
                   group_size: int = DEFAULT_GROUP_SIZE, physical: bool = False) -> "ModelProgram":
        """expert_dtype, group_size: the experts' format in host memory (`quant`); physical: keep a placement's
        order of the expert stacks (`BlockProgram.from_block`)."""
        mem = mem or Memories.for_device()
        cfg = model.config
        dtype = jnp.dtype(cfg.dtype)
        lm_head = None if cfg.tie_word_embeddings else jax.device_put(model.lm_head[...], mem.on_device)
        return cls(cfg, jax.device_put(model.shared[...], mem.on_device), lm_head,
                   StackProgram.from_stack(model.encoder, mem, dtype, expert_dtype, group_size, physical),
                   StackProgram.from_stack(model.decoder, mem, dtype, expert_dtype, group_size, physical), mem)

    def embed(self, ids):
        return _embed(self.shared, ids, self.config.dtype)

    def logits(self, hidden):
        return _logits(hidden, self.shared, self.lm_head, self.config.d_model)


@functools.partial(jax.jit, static_argnums=2)
def _embed(shared, ids, dtype):
    return shared[ids].astype(dtype)


_logits = jax.jit(lm_logits, static_argnums=3)


def _cross_kv_impl(graphdef, state, placeholder, encoder_hidden):
    block = nnx.merge(graphdef.value, placeholder, state)
    return CrossKV(*block.cross_attn.project_kv(encoder_hidden))


cross_kv = jax.jit(_cross_kv_impl, static_argnums=0)
