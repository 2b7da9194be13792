"""Parity with Hugging Face `SwitchTransformersForConditionalGeneration` on the stored fixtures.

Each fixture under tests/fixtures/hf/ is a tiny random HF checkpoint plus what HF computed from it
(scripts/make_hf_fixtures.py says what each one exercises). We load the checkpoint with
`from_pretrained` and compare logits, router logits, router losses and greedy tokens. No torch needed.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from pregated_jax.hf_checkpoint import from_pretrained

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "hf"
FIXTURES = sorted(p.name for p in FIXTURE_DIR.iterdir() if (p / "expected.npz").is_file())
LOGIT_ATOL = 1e-4
LOSS_TOL = 1e-5  # relative (z-losses are ~100, where float32 rounding alone is ~1e-5 absolute)


def test_fixtures_present():
    assert len(FIXTURES) >= 5, f"expected the HF fixtures under {FIXTURE_DIR}; run scripts/make_hf_fixtures.py"


@functools.cache
def load(name: str):
    """(model, expected arrays) of one fixture, loaded once per test session."""
    expected = dict(np.load(FIXTURE_DIR / name / "expected.npz"))
    return from_pretrained(FIXTURE_DIR / name), expected


@nnx.jit
def _forward(model, input_ids, decoder_input_ids, attention_mask, decoder_attention_mask):
    return model(input_ids, decoder_input_ids, attention_mask, decoder_attention_mask, return_aux=True)


@functools.cache
def forward(name: str):
    model, e = load(name)
    logits, aux = _forward(model, e["input_ids"], e["decoder_input_ids"], e["attention_mask"],
                           e["decoder_attention_mask"])
    return np.asarray(logits), aux


def np_z_loss(logits):
    """HF's router_z_loss_func in numpy (float64)."""
    logits = logits.astype(np.float64)
    m = logits.max(-1, keepdims=True)
    log_z = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
    return np.sum(log_z ** 2) / (logits.shape[0] * logits.shape[1])


def np_load_balancing_loss(logits):
    """HF's load_balancing_loss_func(softmax(logits), argmax(logits)) in numpy (float64)."""
    logits = logits.astype(np.float64)
    e = logits.shape[-1]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    onehot = np.eye(e)[logits.argmax(-1)]
    return np.mean(onehot.mean(-2) * probs.mean(-2)) * e ** 2


@pytest.mark.parametrize("name", FIXTURES)
def test_logits_match_hf(name):
    logits, _ = forward(name)
    want = load(name)[1]["logits"]
    assert logits.shape == want.shape
    diff = np.abs(logits - want).max()
    assert diff <= LOGIT_ATOL, f"{name}: max |logit diff| {diff:.3g} > {LOGIT_ATOL}"


@pytest.mark.parametrize("name", FIXTURES)
def test_router_logits_match_hf(name):
    _, aux = forward(name)
    e = load(name)[1]
    for stack, decisions in (("encoder", aux.encoder_decisions), ("decoder", aux.decoder_decisions)):
        ours = np.concatenate([np.asarray(d.logits) for d in decisions], axis=1)
        np.testing.assert_allclose(ours, e[f"{stack}_router_logits"], rtol=1e-5, atol=1e-4,
                                   err_msg=f"{name}: {stack} router logits")


@pytest.mark.parametrize("name", FIXTURES)
def test_router_losses_match_hf(name):
    model, e = load(name)
    _, aux = forward(name)
    cfg = model.config
    for stack, step in (("encoder", cfg.encoder_sparse_step), ("decoder", cfg.decoder_sparse_step)):
        for kind, reference in (("z_loss", np_z_loss), ("aux_loss", np_load_balancing_loss)):
            ours = float(getattr(aux, f"{stack}_{kind}"))
            want = float(e[f"{stack}_{kind}"])
            if step == 1:
                # transformers computes a stack's losses only when its sparse step is > 1 and reports 0
                # for an all-sparse stack; we compute the real loss, checked against HF's router logits.
                assert want == 0.0
                want = reference(e[f"{stack}_router_logits"])
            assert ours == pytest.approx(want, rel=LOSS_TOL, abs=LOSS_TOL), f"{name}: {stack}_{kind}"


@pytest.mark.parametrize("name", FIXTURES)
def test_greedy_matches_hf(name):
    try:
        from pregated_jax.generation import generate
    except ImportError as err:
        pytest.skip(f"pregated_jax.generation is not importable yet: {err}")
    model, e = load(name)
    max_new = int(e["max_new_tokens"])
    ours = np.asarray(generate(model, e["input_ids"], attention_mask=e["attention_mask"], max_new_tokens=max_new))
    assert ours.shape == (e["input_ids"].shape[0], max_new)
    # HF's output starts with the decoder start token and stops once every row has finished.
    hf = e["greedy"]
    assert (hf[:, 0] == model.config.decoder_start_token_id).all()
    hf_new = hf[:, 1:]
    np.testing.assert_array_equal(ours[:, :hf_new.shape[1]], hf_new, err_msg=f"{name}: greedy tokens")
    assert (ours[:, hf_new.shape[1]:] == model.config.pad_token_id).all(), f"{name}: tokens after every EOS"
