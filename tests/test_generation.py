"""Cached, jitted greedy generation against a naive loop that recomputes the full forward every step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pregated_jax.config import get_preset
from pregated_jax.generation import generate
from pregated_jax.model import SwitchTransformer


def naive_greedy(model, ids, mask, steps):
    cfg = model.config
    dec = np.full((ids.shape[0], 1), cfg.decoder_start_token_id, np.int32)
    done = np.zeros(ids.shape[0], bool)
    out = np.full((ids.shape[0], steps), cfg.pad_token_id, np.int32)
    for t in range(steps):
        nxt = np.asarray(jnp.argmax(model(ids, jnp.asarray(dec), mask)[:, -1], -1))
        nxt = np.where(done, cfg.pad_token_id, nxt)
        out[:, t] = nxt
        done |= nxt == cfg.eos_token_id
        dec = np.concatenate([dec, nxt[:, None]], 1)
    return out


@pytest.mark.parametrize("routing", ["conventional", "pregated"])
@pytest.mark.slow
def test_greedy_matches_full_recompute(routing):
    cfg = get_preset("tiny", routing=routing)
    model = SwitchTransformer(cfg, rngs=nnx.Rngs(0))
    model.eval()
    ids = jax.random.randint(jax.random.key(1), (3, 7), 2, cfg.vocab_size)
    mask = jnp.array([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4])
    np.testing.assert_array_equal(generate(model, ids, mask, 6), naive_greedy(model, ids, mask, 6))


@pytest.mark.slow
def test_eos_stops_a_sequence_and_pads_the_rest():
    base = SwitchTransformer(get_preset("tiny"), rngs=nnx.Rngs(0))
    base.eval()
    ids = jax.random.randint(jax.random.key(2), (2, 5), 2, 128)
    first = generate(base, ids, max_new_tokens=4)
    # Declare the token that row 0 emits at step 1 to be EOS: row 0 must stop right there.
    eos = int(first[0, 1])
    model = SwitchTransformer(get_preset("tiny", eos_token_id=eos), rngs=nnx.Rngs(0))
    model.eval()
    out = generate(model, ids, max_new_tokens=4)
    ref = naive_greedy(model, ids, None, 4)
    np.testing.assert_array_equal(out, ref)
    stop = int(np.argmax(out[0] == eos))
    assert stop <= 1 and (out[0, stop + 1:] == 0).all()


def test_generate_rejects_bad_input():
    model = SwitchTransformer(get_preset("tiny"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="batch, length"):
        generate(model, jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="attention_mask shape"):
        generate(model, jnp.zeros((2, 4), jnp.int32), jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, jnp.zeros((2, 4), jnp.int32), max_new_tokens=0)
