"""Conventional -> pre-gated conversion: block N's pre-gate starts as block N+1's gate."""

import jax
import numpy as np
from flax import nnx

from pregated_jax.config import get_preset
from pregated_jax.convert import to_pregated
from pregated_jax.model import SwitchTransformer


def test_pregates_copy_the_next_gate_and_everything_else_is_equal():
    cfg = get_preset("tiny", num_layers=6, num_sparse_encoder_layers=3)
    conv = SwitchTransformer(cfg, rngs=nnx.Rngs(0))
    pre = to_pregated(conv)
    assert pre.config.routing == "pregated" and conv.config.routing == "conventional"
    for stack in ("encoder", "decoder"):
        sparse = cfg.sparse_blocks(stack)
        src, dst = getattr(conv, stack).blocks, getattr(pre, stack).blocks
        np.testing.assert_array_equal(dst[sparse[0]].router.classifier[...], src[sparse[0]].router.classifier[...])
        for a, b in zip(sparse, sparse[1:]):
            np.testing.assert_array_equal(dst[a].pregate.classifier[...], src[b].router.classifier[...])
        assert dst[sparse[-1]].pregate is None
    for name in ("shared",):
        np.testing.assert_array_equal(getattr(pre, name)[...], getattr(conv, name)[...])
    np.testing.assert_array_equal(pre.decoder.blocks[3].experts.wi[...], conv.decoder.blocks[3].experts.wi[...])


def test_first_moe_block_routes_identically_after_conversion():
    cfg = get_preset("tiny")
    conv = SwitchTransformer(cfg, rngs=nnx.Rngs(1))
    conv.eval()
    pre = to_pregated(conv)
    ids = jax.random.randint(jax.random.key(0), (2, 8), 2, cfg.vocab_size)
    _, a = conv(ids, ids, return_aux=True)
    _, b = pre(ids, ids, return_aux=True)
    np.testing.assert_array_equal(a.encoder_decisions[0].expert_index, b.encoder_decisions[0].expert_index)
