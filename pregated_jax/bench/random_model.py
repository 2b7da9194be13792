"""Random-weight models at real shapes, for benchmarks (never zeros: zeros can run unrealistically fast)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

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
        leaf_key = jax.random.fold_in(key, n)
        draw = lambda k, shp: (jax.random.normal(k, shp, leaf_dtype) * std).astype(leaf_dtype)  # noqa: E731
        if std is None:
            value = jnp.ones(shape, leaf_dtype)
        elif experts_on_host and len(path) >= 2 and path[-2] == "experts":
            # a few experts at a time through numpy, so the device peak stays small
            parts = [np.asarray(jax.device_get(draw(jax.random.fold_in(leaf_key, i), (min(8, shape[0] - i),) + shape[1:])))
                     for i in range(0, shape[0], 8)]
            value = jax.device_put(np.concatenate(parts), mem.on_host)
        else:
            value = draw(leaf_key, shape)
        params[path] = value
    return materialize(abstract_model(config), params, seed)
