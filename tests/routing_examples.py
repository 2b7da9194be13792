"""A small routing decision and numbered expert stacks, shared by the fetch tests."""

import jax
import jax.numpy as jnp

from pregated_jax.routing import RouterDecision

E = 8  # experts
ROUTED = {0, 1, 3, 4, 6}  # the distinct kept experts of `routed_decision`


def numbered_stacks(where, e: int = E):
    """host_wi [e, 2, 3] and host_wo [e, 3, 2], every entry distinct and non-zero, placed at `where`."""
    host_wi = jax.device_put(jnp.arange(e * 2 * 3, dtype=jnp.float32).reshape(e, 2, 3) + 1, where)
    host_wo = jax.device_put(-jnp.arange(e * 3 * 2, dtype=jnp.float32).reshape(e, 3, 2) - 1, where)
    return host_wi, host_wo


def routed_decision(e: int = E) -> RouterDecision:
    """Ten tokens routed to experts ROUTED; expert 3 is dropped once and kept once."""
    index = jnp.array([[6, 1, 6, 4, 3, 1, 0, 6, 3, 4]], jnp.int32)  # [B=1, S=10]
    keep = jnp.array([[1, 1, 1, 1, 0, 1, 1, 1, 1, 1]], bool)
    return RouterDecision(expert_index=index, combine_weight=jnp.ones(index.shape), keep=keep,
                          logits=jnp.zeros(index.shape + (e,)))
