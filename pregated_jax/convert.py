"""Turning a conventional Switch model into a pre-gated one.

Block N's pre-gate is initialized from block N+1's gate (the MoE blocks of one stack, in order); the
first MoE block keeps its own gate; every other weight is copied. Before any fine-tuning the result
routes block N+1 by applying block N+1's old gate to block N's MoE input.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from pregated_jax.model import SwitchTransformer, abstract_model, materialize


def pregate_source(config, path: tuple) -> tuple:
    """Param path in a conventional model that initializes `path` of its pre-gated counterpart."""
    if path[-2:] != ("pregate", "classifier"):
        return path
    stack, _, block = path[:3]
    sparse = config.sparse_blocks(stack)
    return (stack, "blocks", sparse[sparse.index(block) + 1], "router", "classifier")


def to_pregated(model: SwitchTransformer, seed: int = 0) -> SwitchTransformer:
    """Returns a new pre-gated model built from a conventional one (the input is left untouched)."""
    cfg = model.config
    if cfg.routing != "conventional":
        raise ValueError(f"to_pregated expects a conventional model, got routing={cfg.routing!r}")
    new = abstract_model(cfg.replace(routing="pregated"))
    src = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    targets = [p for p, _ in nnx.to_flat_state(nnx.state(new, nnx.Param))]
    # jnp.array copies: the two models share no buffers.
    return materialize(new, {p: jnp.array(src[pregate_source(cfg, p)]) for p in targets}, seed)
