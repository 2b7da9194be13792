"""The quantized expert store: scripts/quantize.py writes it, pj.load_model reads it back without quantizing
or building unquantized experts, and the engine generates from it what it generates at that format."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pregated_jax import quant as Q
from pregated_jax.engine import InferenceEngine
from pregated_jax.hf_checkpoint import save_pretrained
from pregated_jax.loading import load_model
from pregated_jax.quant_store import STORE_FILE, save_quantized, store_format

ROOT = Path(__file__).resolve().parent.parent
IDS = np.asarray(jax.random.randint(jax.random.key(1), (2, 7), 2, 128))


def _quantize_script():
    spec = importlib.util.spec_from_file_location("quantize_script", ROOT / "scripts" / "quantize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model(tiny_pregated):
    return tiny_pregated


def _params(model):
    return {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def store(model, tmp_path_factory):
    """An int4 store (group 16) written by scripts/quantize.py from a Hugging Face directory."""
    tmp = tmp_path_factory.mktemp("store")
    save_pretrained(model, tmp / "hf")
    _quantize_script().main(["--checkpoint", str(tmp / "hf"), "--expert_dtype", "int4",
                             "--expert_group_size", "16", "--out", str(tmp / "store")])
    return tmp / "store"


def test_store_round_trip_loads_the_quantized_bytes(model, store, monkeypatch):
    assert (store / STORE_FILE).is_file() and (store / "spiece.model").is_file()
    assert store_format(store) == ("int4", 16)

    def refuse(*args):
        raise AssertionError("loading a store must not quantize")

    monkeypatch.setattr(Q, "_quantize", refuse)
    loaded = load_model(store)
    monkeypatch.undo()
    original, restored = _params(model), _params(loaded)
    assert original.keys() == restored.keys()
    for path, value in original.items():
        if path[-2:-1] == ("experts",):
            want = Q.quantize(value, "int4", group_size=16)
            got = restored[path]
            assert isinstance(got, Q.QuantizedExperts) and got.format == "int4" and got.values.dtype == jnp.uint8
            np.testing.assert_array_equal(np.asarray(got.values), np.asarray(want.values))
            np.testing.assert_array_equal(np.asarray(got.scales), np.asarray(want.scales))
        else:
            np.testing.assert_array_equal(np.asarray(restored[path]), np.asarray(value), err_msg=str(path))


@pytest.mark.slow
def test_engine_from_a_store_generates_what_it_generates_at_that_format(model, store):
    loaded = load_model(store)
    ref = InferenceEngine(model, mode="gpu-only", expert_dtype="int4", expert_group_size=16)
    engine = InferenceEngine(loaded, mode="pregated", expert_dtype="int4")  # keeps the store's group size
    assert engine.expert_bytes == ref.expert_bytes
    with jax.transfer_guard("disallow"):
        want, got = ref.generate(IDS, max_new_tokens=4), engine.generate(IDS, max_new_tokens=4)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    with pytest.raises(ValueError, match="stored as int4, but expert_dtype is 'int8': use expert_dtype='int4'"):
        InferenceEngine(loaded, mode="gpu-only", expert_dtype="int8")


def test_float8_store_keeps_the_values_and_bfloat16_is_refused(model, tmp_path):
    save_quantized(model, tmp_path / "fp8", "float8_e4m3fn")
    loaded = load_model(tmp_path / "fp8")
    got = loaded.decoder.blocks[1].experts.wo[...]
    want = Q.quantize(model.decoder.blocks[1].experts.wo[...], "float8_e4m3fn")
    assert got.values.dtype == jnp.float8_e4m3fn
    np.testing.assert_array_equal(np.asarray(got.values, np.float32), np.asarray(want.values, np.float32))
    with pytest.raises(ValueError, match="needs a quantized expert dtype, got 'bfloat16'"):
        save_quantized(model, tmp_path / "bf16", "bfloat16")


def test_quantize_with_dtype_bfloat16_quantizes_the_bf16_experts(model, tmp_path):
    """scripts/quantize.py --dtype bfloat16 reads a float32 checkpoint's experts in bfloat16 (half the host
    memory) and quantizes those: the store holds quantize(bf16(w)) and records bfloat16 as its compute dtype."""
    save_pretrained(model, tmp_path / "hf")
    _quantize_script().main(["--checkpoint", str(tmp_path / "hf"), "--expert_dtype", "int8", "--dtype", "bfloat16",
                             "--out", str(tmp_path / "store")])
    loaded = load_model(tmp_path / "store")
    assert loaded.config.dtype == "bfloat16"
    restored = _params(loaded)
    for path, value in _params(model).items():
        if path[-2:-1] == ("experts",):
            want = Q.quantize(np.asarray(value).astype(jnp.bfloat16), "int8")
            np.testing.assert_array_equal(np.asarray(restored[path].values), want.values, err_msg=str(path))
            np.testing.assert_array_equal(np.asarray(restored[path].scales), want.scales, err_msg=str(path))
