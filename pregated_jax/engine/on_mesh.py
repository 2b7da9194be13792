"""The engine's dispatches on a mesh: its prefill and fused decode steps, each one `jax.shard_map`.

The body of each is the single-device engine's code run by every device on its rows and its share of the
experts (`mesh_layout` describes the split). Per-device state (the expert caches) is held as global arrays
with a leading axis of one entry per device (`mesh_layout.DEVICES`); the counters come back summed over the
mesh. `check_vma=False`: the body is the single-device code, which does not annotate which values vary per
device (the copies read each device's own experts); its collectives are written out explicitly (the MoE
outputs' sum, the counters' sums, the decode loop's exit).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from pregated_jax.engine import cache as C
from pregated_jax.engine.context import RunContext
from pregated_jax.engine.mesh_layout import DATA, DEVICES, per_device, spec_of, this_device
from pregated_jax.engine.search import SearchState

ROWS = P(DATA)  # a request's rows split over `data`, replicated over `expert`
SEARCH = SearchState(ROWS, ROWS, ROWS, ROWS, P(), ROWS)  # the step counter is the same on every device


def check_config(config) -> None:
    """Options that need one device."""
    if config.copy_method == "dma":
        raise ValueError("copy_method='dma' (the native copies) serves one device; on a mesh each device copies "
                         "its experts with XLA's copies: use copy_method='auto' or 'xla'")
    if config.guess_first_block:
        raise ValueError("guess_first_block needs one device; on a mesh leave it off")


def _shard_map(engine, body, in_specs, out_specs):
    return jax.shard_map(body, mesh=engine.layout.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def _specs(leaves) -> list[P]:
    return [spec_of(leaf) for leaf in leaves]


def empty_caches(engine, block) -> C.CacheState:
    """One MoE block's empty cache on every device, each over its own share of the experts -> CacheState whose
    arrays carry a leading per-device axis."""
    slots, device = engine.cache_slots, engine.mem.on_device

    def body(wi, wo):
        return per_device(C.empty_cache(slots, wi, wo, device))

    specs = (jax.tree.map(spec_of, block.host_wi), jax.tree.map(spec_of, block.host_wo))
    return jax.jit(_shard_map(engine, body, specs, P(DEVICES)))(block.host_wi, block.host_wo)


def decode_step(engine):
    """`InferenceEngine._flat_step`'s signature, run by every device on its rows and experts: the experts
    copied and the speculation counts come back summed over the mesh."""
    layout = engine.layout
    leaf_specs = _specs(engine._decoder_leaves)

    def step(treedef, leaves, search, kv, cross, cross_bias, caches, key_positions, num_beams, num_steps, guess):
        def body(leaves, search, kv, cross, cross_bias, caches, key_positions):
            search, kv, caches, copied, speculation, _, routing = engine._flat_step(
                treedef, leaves, search, kv, cross, cross_bias, this_device(caches), key_positions, num_beams,
                num_steps, None)
            return (search, kv, per_device(caches), layout.all_devices(copied), layout.all_devices(speculation),
                    layout.over_data(routing))

        run = _shard_map(engine, body, (leaf_specs, SEARCH, ROWS, ROWS, ROWS, P(DEVICES), P()),
                         (SEARCH, ROWS, P(DEVICES), P(), P(), P()))
        search, kv, caches, copied, speculation, routing = run(leaves, search, kv, cross, cross_bias, caches,
                                                               key_positions)
        return search, kv, caches, copied, speculation, None, routing

    return step


class Prefill:
    """The prefill on a mesh: the encoder, cross-attention keys/values, the decoder's empty caches and search
    state, as one dispatch. Called with the (padded) request in host memory."""

    def __init__(self, engine):
        self.engine = engine
        self.leaves, self.treedef = jax.tree.flatten(engine.program)
        self.leaf_specs = _specs(self.leaves)
        self._run = jax.jit(self._dispatch, static_argnums=(4, 5), donate_argnums=3)

    def __call__(self, input_ids: np.ndarray, mask: np.ndarray, num_beams: int, max_new_tokens: int, stats):
        """input_ids, mask [B, S] (B divides by `data`) -> (hidden, cross, cross_bias, kv, key_positions, search),
        sharded by rows; the engine's caches updated and the copies counted into `stats`."""
        engine = self.engine
        rows = NamedSharding(engine.layout.mesh, ROWS)
        ids, mask = jax.device_put(input_ids, rows), jax.device_put(mask, rows)
        *out, engine.caches, copied, speculation, routing = self._run(
            self.leaves, ids, mask, engine.caches, num_beams, max_new_tokens)
        stats.add_copied(copied)
        stats.add_speculation(speculation)
        stats.add_routing(routing)
        return tuple(out)

    def _dispatch(self, leaves, ids, mask, caches, num_beams, max_new_tokens):
        engine = self.engine
        layout, cfg = engine.layout, engine.model_config

        def body(leaves, ids, mask, caches):
            program = jax.tree.unflatten(self.treedef, leaves)
            ctx = RunContext(this_device(caches), engine.mem.on_device)
            # ids, mask: this data group's rows
            out = engine.encode_for_decoding(program, ctx, ids, mask, num_beams, max_new_tokens, lambda a: a)
            copied, speculation = ctx.totals()
            routing = ctx.routing(engine.num_moe_blocks, cfg.num_experts)
            return (*out, per_device(ctx.caches), layout.all_devices(copied), layout.all_devices(speculation),
                    layout.over_data(routing))

        # hidden, cross, cross_bias, kv, key_positions, search, then the caches and the counters
        run = _shard_map(engine, body, (self.leaf_specs, ROWS, ROWS, P(DEVICES)),
                         (ROWS, ROWS, ROWS, ROWS, P(), SEARCH, P(DEVICES), P(), P(), P()))
        return run(leaves, ids, mask, caches)

