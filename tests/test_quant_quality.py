"""scripts/quant_quality.py: its logit difference is 0 for the unquantized format and, for int8, positive and
within a bound derived by hand from int8's rounding error; its command line parses."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pregated_jax.config import get_preset
from pregated_jax.model import SwitchTransformer

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("quant_quality_script", ROOT / "scripts" / "quant_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


qq = _load_script()


@pytest.fixture(scope="module")
def setup():
    """A tiny conventional model whose only experts that matter sit in the decoder's last block (block 1 of 2):
    the encoder's MoE block (HF's layout always has one) gets all-zero experts, which every format stores
    exactly. Then quantizing changes nothing before that block's expert matmuls (its router reads the
    unchanged FFN input), and only the final norm and the LM head come after them."""
    cfg = get_preset("tiny", routing="conventional", num_layers=2, num_decoder_layers=2, num_sparse_encoder_layers=0,
                     num_sparse_decoder_layers=1, layer_norm_epsilon=0.1)
    assert cfg.sparse_blocks("encoder") == (1,) and cfg.sparse_blocks("decoder") == (1,)
    model = SwitchTransformer(cfg, rngs=nnx.Rngs(0))
    model.eval()
    enc = model.encoder.blocks[1].experts
    enc.wi.set_value(jnp.zeros_like(enc.wi[...]))
    enc.wo.set_value(jnp.zeros_like(enc.wo[...]))
    ids = jax.random.randint(jax.random.key(1), (2, 7), 2, cfg.vocab_size)
    dec = jax.random.randint(jax.random.key(2), (2, 5), 2, cfg.vocab_size)
    batch = {"input_ids": np.asarray(ids), "attention_mask": np.array([[1] * 7, [1] * 4 + [0] * 3]),
             "decoder_input_ids": np.asarray(dec), "decoder_attention_mask": np.array([[1] * 5, [1] * 3 + [0] * 2])}
    return model, batch


def int8_logit_bound(model) -> float:
    """|Δlogit| at any position, int8 against unquantized, for the model of `setup`:

    - int8 stores w[i, j] to within half a step, step = max_i |w[i, j]| / 127.5, so per expert
      ||ΔW||_2 <= ||ΔW||_F <= sqrt(sum_j d_in (max_i |w[i, j]| / 255)^2);
    - the expert input x = ffn_norm(r) has ||x|| <= sqrt(d) max|g_ffn| (x = g * r / sqrt(mean r^2 + eps));
    - ReLU is 1-Lipschitz, so ||ΔE(x)|| <= ||x|| (||ΔWi|| (||Wo|| + ||ΔWo||) + ||Wi|| ||ΔWo||), spectral norms,
      and the combine weight (a softmax probability) is <= 1; this is the change of the residual h;
    - the final norm h -> g * h / sqrt(mean h^2 + eps) is (max|g| / sqrt(eps))-Lipschitz;
    - tied logits are d^-0.5 out @ shared.T, so |Δlogit_v| <= d^-0.5 ||shared_v|| ||Δout||.
    """
    cfg = model.config
    d = cfg.d_model
    block = model.decoder.blocks[1]
    expert_terms = []
    for wi, wo in zip(np.asarray(block.experts.wi[...], np.float64), np.asarray(block.experts.wo[...], np.float64)):
        dwi = np.sqrt(np.sum(wi.shape[0] * (np.abs(wi).max(axis=0) / 255) ** 2))
        dwo = np.sqrt(np.sum(wo.shape[0] * (np.abs(wo).max(axis=0) / 255) ** 2))
        spec_wi, spec_wo = np.linalg.norm(wi, 2), np.linalg.norm(wo, 2)
        expert_terms.append(dwi * (spec_wo + dwo) + spec_wi * dwo)
    x_norm = np.sqrt(d) * np.abs(np.asarray(block.ffn_norm.weight[...])).max()
    dh = x_norm * max(expert_terms)
    dout = np.abs(np.asarray(model.decoder.final_norm.weight[...])).max() / np.sqrt(cfg.layer_norm_epsilon) * dh
    shared = np.asarray(model.shared[...], np.float64)
    return d ** -0.5 * np.linalg.norm(shared, axis=1).max() * dout


def test_logit_difference_zero_unquantized_and_int8_within_hand_bound(setup):
    model, batch = setup
    same = qq.logit_difference(model, batch, "bfloat16", 16)
    assert same["max_abs"] == same["mean_abs"] == 0.0 and same["positions"] == 8
    int8 = qq.logit_difference(model, batch, "int8", 16)
    bound = int8_logit_bound(model)
    assert 0 < int8["mean_abs"] <= int8["max_abs"] <= bound, (int8, bound)
    # The bound is worst-case (aligned rounding errors, the norm's 1/sqrt(eps)), far above int8's actual
    # difference; int4's 16x coarser steps must give a larger one, so a format mix-up shows too.
    assert qq.logit_difference(model, batch, "int4", 16)["mean_abs"] > 4 * int8["mean_abs"]


def test_with_expert_format_holds_the_engines_stacks(setup):
    """The copy's decoder experts are the engine's int4 stacks (QuantizedExperts); the model is unchanged."""
    from pregated_jax.quant import QuantizedExperts

    model, _ = setup
    q = qq.with_expert_format(model, "int4", 16)
    wi = q.decoder.blocks[1].experts.wi[...]
    assert isinstance(wi, QuantizedExperts) and wi.format == "int4" and wi.group_size == 16
    assert not isinstance(model.decoder.blocks[1].experts.wi[...], QuantizedExperts)


def test_fixture_group_size():
    assert qq.fixture_group_size(64, 192, 448) == 64  # the default model: 64 divides both
    assert qq.fixture_group_size(128, 192, 448) == 64  # 128 does not divide 192
    assert qq.fixture_group_size(64, 16, 24) == 8 and qq.fixture_group_size(64, 24, 32) == 8


def test_help():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "quant_quality.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--formats" in proc.stdout and "--group_size" in proc.stdout and "--logit_examples" in proc.stdout
