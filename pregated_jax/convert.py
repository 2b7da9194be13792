"""Turning a conventional Switch model into a pre-gated one.

Block N's pre-gate is initialized from block N+1's gate (the MoE blocks of one stack, in order); the
first MoE block keeps its own gate; every other weight is copied. Before any fine-tuning the result
routes block N+1 by applying block N+1's old gate to block N's MoE input.
"""

from __future__ import annotations

import jax
from flax import nnx

from pregated_jax.model import SwitchTransformer, abstract_model, is_expert_param, materialize


def pregate_source(config, path: tuple) -> tuple:
    """Param path in a conventional model that initializes `path` of its pre-gated counterpart."""
    if path[-2:] != ("pregate", "classifier"):
        return path
    stack, _, block = path[:3]
    sparse = config.sparse_blocks(stack)
    return (stack, "blocks", sparse[sparse.index(block) + 1], "router", "classifier")


def pregated_params(config, params: dict[tuple, object]) -> dict[tuple, object]:
    """The flat params (path -> value) of the pre-gated counterpart of a conventional model with `config` and
    `params`; values are taken as they are (not copied)."""
    if config.routing != "conventional":
        raise ValueError(f"pre-gated params come from a conventional model, got routing={config.routing!r}")
    targets = nnx.to_flat_state(nnx.state(abstract_model(config.replace(routing="pregated")), nnx.Param))
    return {p: params[pregate_source(config, p)] for p, _ in targets}


def _copy(x):
    """A copy of an array in the memory it is in (pinned host memory stays there)."""
    return jax.device_put(x, x.sharding, may_alias=False)


def to_pregated(model: SwitchTransformer, seed: int = 0) -> SwitchTransformer:
    """Returns a new pre-gated model built from a conventional one (the input is left untouched). Expert stacks
    kept in host memory (`experts_on="host"`) are copied there."""
    cfg = model.config
    if cfg.routing != "conventional":
        raise ValueError(f"to_pregated expects a conventional model, got routing={cfg.routing!r}")
    src = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    # copies: the two models share no buffers
    params = {p: jax.tree.map(_copy, v) for p, v in pregated_params(cfg, src).items()}
    default = jax.devices()[0].default_memory().kind
    kinds = {a.sharding.memory_kind for p, v in params.items() if is_expert_param(p) for a in jax.tree.leaves(v)}
    kind = next(iter(kinds)) if len(kinds) == 1 and kinds != {default} else None
    return materialize(abstract_model(cfg.replace(routing="pregated")), params, seed, expert_memory_kind=kind)
