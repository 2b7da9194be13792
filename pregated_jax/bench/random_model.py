"""Random-weight models at real shapes, for benchmarks (never zeros: zeros can run unrealistically fast)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pregated_jax import quant
from pregated_jax.config import SwitchConfig
from pregated_jax.engine.placement import Memories
from pregated_jax.memory import put_on_host
from pregated_jax.model import SwitchTransformer, abstract_model, materialize, param_shapes


def _std(path: tuple, shape: tuple) -> float | None:
    """None: a norm weight (ones). Otherwise a fan-in scaled normal, embeddings std 1."""
    if path[-1] == "weight":
        return None
    if path[-1] in ("shared", "embedding"):
        return 1.0
    return shape[-2] ** -0.5


def random_model(config: SwitchConfig, seed: int = 0, experts_on_host: bool = True,
                 mem: Memories | None = None, expert_dtype: str = "bfloat16",
                 group_size: int = quant.DEFAULT_GROUP_SIZE) -> SwitchTransformer:
    """A model with random weights in `config.dtype` (routers in float32).

    Non-expert leaves are drawn on the device. With `experts_on_host`, each expert stack is assembled in
    host memory from windows at random offsets into a pool of normal draws (one pool per scale) and
    moved to host memory, so the device never holds them: drawing tens of billions of independent values
    took minutes per model; windows keep every expert distinct and nonzero at memcpy speed.
    With `experts_on_host` and a quantized `expert_dtype` (`quant.FORMATS`), each stack is quantized before it
    goes to host memory (`quant.quantize`, the engine's own conversion of the same draws), so host memory holds
    only the quantized stacks, as with a quantized store (`scripts/quantize.py`).
    """
    quant.check_format(expert_dtype)
    mem = mem or Memories.for_device()
    dtype = jnp.dtype(config.dtype)
    key = jax.random.key(seed)
    rng = np.random.default_rng(seed)
    pools: dict = {}
    params = {}
    for n, (path, shape) in enumerate(param_shapes(config).items()):
        std = _std(path, shape)
        is_router = path[-1] == "classifier"
        leaf_dtype = jnp.float32 if is_router else dtype
        if std is None:
            value = jnp.ones(shape, leaf_dtype)
        elif experts_on_host and len(path) >= 2 and path[-2] == "experts":
            stack = _host_stack(shape, std, leaf_dtype, rng, pools)  # numpy [E, d_in, d_out]
            value = put_on_host(quant.quantize(stack, expert_dtype, group_size), mem.on_host, ".".join(map(str, path)))
        else:
            value = (jax.random.normal(jax.random.fold_in(key, n), shape, leaf_dtype) * std).astype(leaf_dtype)
        params[path] = value
    return materialize(abstract_model(config), params, seed, release=True)


def _host_stack(shape: tuple, std: float, dtype, rng: np.random.Generator, pools: dict) -> np.ndarray:
    """[E, ...] expert stack: expert e is a window of `pool(std)` at a random offset -> numpy array."""
    per_expert = int(np.prod(shape[1:]))
    pool = pools.get((std, per_expert))
    if pool is None:
        draws = rng.standard_normal(max(4 * per_expert, 1 << 16), dtype=np.float32) * std
        pool = pools[(std, per_expert)] = draws.astype(dtype)
    out = np.empty(shape, dtype)
    for e, offset in enumerate(rng.integers(0, pool.size - per_expert + 1, shape[0])):
        out[e] = pool[offset:offset + per_expert].reshape(shape[1:])
    return out
