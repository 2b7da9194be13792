"""Random-weight models at real shapes, for benchmarks (never zeros: zeros can run unrealistically fast)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pregated_jax.config import SwitchConfig
from pregated_jax.engine.placement import Memories
from pregated_jax.model import SwitchTransformer, abstract_model, materialize, param_shapes


def _std(path: tuple, shape: tuple) -> float | None:
    """None: a norm weight (ones). Otherwise a fan-in scaled normal, embeddings std 1."""
    if path[-1] == "weight":
        return None
    if path[-1] in ("shared", "embedding"):
        return 1.0
    return shape[-2] ** -0.5


def random_model(config: SwitchConfig, seed: int = 0, experts_on_host: bool = True,
                 mem: Memories | None = None) -> SwitchTransformer:
    """A model with random weights in `config.dtype` (routers in float32).

    Leaves are generated one at a time on the device; with `experts_on_host` each expert stack moves to
    host memory right after it is drawn, so the device never holds all experts at once.
    """
    mem = mem or Memories.for_device()
    dtype = jnp.dtype(config.dtype)
    key = jax.random.key(seed)
    params = {}
    for n, (path, shape) in enumerate(param_shapes(config).items()):
        std = _std(path, shape)
        is_router = path[-1] == "classifier"
        leaf_dtype = jnp.float32 if is_router else dtype
        if std is None:
            value = jnp.ones(shape, leaf_dtype)
        else:
            value = (jax.random.normal(jax.random.fold_in(key, n), shape, leaf_dtype) * std).astype(leaf_dtype)
        if experts_on_host and len(path) >= 2 and path[-2] == "experts":
            value = jax.device_put(value, mem.on_host)
        params[path] = value
    return materialize(abstract_model(config), params, seed)
