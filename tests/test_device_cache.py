"""The device-resident expert cache (jitted bookkeeping + copies) against the pure-Python simulator."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pregated_jax.engine import cache as C
from pregated_jax.engine import fetch as F
from pregated_jax.engine.cache_sim import ExpertCacheSim
from pregated_jax.engine.placement import Memories
from routing_examples import ROUTED, numbered_stacks, routed_decision


@pytest.mark.parametrize("policy", C.POLICIES)
def test_slot_by_slot_equal_to_simulator(policy):
    mem = Memories.for_device()
    e, k, capacity = 10, 3, 4
    host_wi = jax.device_put(jnp.arange(e * 2 * 3, dtype=jnp.float32).reshape(e, 2, 3), mem.on_host)
    host_wo = jax.device_put(-jnp.arange(e * 3 * 2, dtype=jnp.float32).reshape(e, 3, 2), mem.on_host)
    rng = np.random.default_rng(7)
    sim = ExpertCacheSim(capacity, policy)
    states = {b: C.empty_cache(capacity, host_wi, host_wo, mem.on_device) for b in ("enc1", "dec3")}
    for step in range(40):
        block = ("enc1", "dec3")[rng.integers(2)]
        # skewed choice so that hits and evictions both happen
        needed = sorted(set(rng.choice(e, size=rng.integers(1, k + 1), p=_zipf(e)).tolist()))
        sim.access(block, needed)
        padded = jnp.asarray(needed + [-1] * (k - len(needed)), jnp.int32)
        states[block] = C.cache_lookup(states[block], host_wi, host_wo, padded, policy, mem.on_device)
        ids = np.asarray(states[block].slots.expert_ids)
        expected = [-1 if s is None else s for s in sim.slots(block)]
        np.testing.assert_array_equal(ids, expected, err_msg=f"{policy} step {step} {block} {needed}")
        for slot, expert in enumerate(ids):  # the weights in each slot are that expert's
            if expert >= 0:
                np.testing.assert_array_equal(states[block].slots.wi[slot], host_wi[expert])
                np.testing.assert_array_equal(states[block].slots.wo[slot], host_wo[expert])
    hits = sum(int(s.hits) for s in states.values())
    misses = sum(int(s.misses) for s in states.values())
    assert (hits, misses) == (sim.stats.hits, sim.stats.misses)
    assert hits > 0 and misses > capacity  # the trace exercised evictions


def _zipf(n):
    p = 1.0 / np.arange(1, n + 1)
    return p / p.sum()


def test_needed_experts_ignores_dropped_tokens():
    from pregated_jax.routing import RouterDecision

    d = RouterDecision(expert_index=jnp.array([[3, 1, 3, 5]]), combine_weight=jnp.ones((1, 4)),
                       keep=jnp.array([[True, True, True, False]]), logits=jnp.zeros((1, 4, 8)))
    np.testing.assert_array_equal(F.needed_experts(d, 4), [1, 3, -1, -1])


@pytest.mark.parametrize("exclude", [None, [4, 1]])
def test_compact_fetch_copies_exactly_the_routed_experts(exclude):
    """fetch_decision(compact=True) (the prefill's loop over routed experts) against a plain reference: the
    distinct kept experts minus `exclude`, each slot holding its expert's weights, empty slots zero."""
    mem = Memories.for_device()
    k = 8
    host_wi, host_wo = numbered_stacks(mem.on_host)
    decision = routed_decision()
    excl = None if exclude is None else jnp.asarray(exclude, jnp.int32)
    slots, copied = F.fetch_decision(host_wi, host_wo, decision, k, mem.on_device, excl, compact=True)
    want = sorted(ROUTED - set(exclude or []))
    ids = np.asarray(slots.expert_ids)
    assert ids[:len(want)].tolist() == want and (ids[len(want):] == -1).all() and int(copied) == len(want)
    for slot, expert in enumerate(ids):
        np.testing.assert_array_equal(slots.wi[slot], host_wi[expert] if expert >= 0 else 0)
        np.testing.assert_array_equal(slots.wo[slot], host_wo[expert] if expert >= 0 else 0)
