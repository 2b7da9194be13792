"""The host-memory measurement of quantized stores (`pregated_jax.bench.store_memory`, scripts/store_memory.py): the
shape-only byte table equals the bytes of really quantized stacks, and the measured pipeline runs end to end."""

import numpy as np
import pytest
from flax import nnx

from pregated_jax import quant as Q
from pregated_jax.bench import store_memory as sm
from pregated_jax.config import get_preset
from pregated_jax.model import is_expert_param, param_shapes


def _by_hand(config, fmt, group_size):
    """Expert bytes written out from the shapes: values + float32 scales per stack [E, d_in, d_out]."""
    total = 0
    for path, shape in param_shapes(config).items():
        if not is_expert_param(path):
            continue
        e, d_in, d_out = shape
        if fmt == "bfloat16":
            total += 2 * e * d_in * d_out
        elif fmt in ("int8", "float8_e4m3fn"):  # one byte a value, one scale per expert and output channel
            total += e * d_in * d_out + 4 * e * d_out
        else:  # int4: two values a byte, one scale per group of input rows and output channel
            total += e * d_in // 2 * d_out + 4 * e * (d_in // group_size) * d_out
    return total


@pytest.mark.parametrize("group_size", [16, 32])
def test_byte_table_matches_quantized_stacks(group_size):
    config = get_preset("tiny")
    rows = {r["format"]: r for r in sm.store_bytes_table(["tiny"], group_size=group_size)}
    assert set(rows) == set(Q.FORMATS)
    rng = np.random.default_rng(0)
    for fmt in Q.FORMATS:
        real = 0
        for path, shape in param_shapes(config).items():
            if is_expert_param(path):
                w = rng.standard_normal(shape, dtype=np.float32)
                q = Q.quantize(w, fmt, group_size)
                real += 2 * w.size if fmt == "bfloat16" else q.nbytes  # bf16: the stack cast, 2 bytes a value
        assert rows[fmt]["expert_bytes"] == real == _by_hand(config, fmt, group_size), fmt
    assert rows["int8"]["ratio_to_bfloat16"] == pytest.approx(_by_hand(config, "int8", 1) / _by_hand(config, "bfloat16", 1))


def test_large_128_int8_within_the_issue_bound():
    bf16, int8 = sm.store_bytes_table(["switch-large-128"], ("bfloat16", "int8"))
    assert int8["ratio_to_bfloat16"] <= 0.55 and int8["expert_bytes"] == _by_hand(get_preset("switch-large-128"),
                                                                                    "int8", 128)


def test_streamed_bf16_checkpoint_loads_like_save_pretrained(tmp_path):
    from pregated_jax.bench.random_model import random_model
    from pregated_jax.hf_checkpoint import save_pretrained
    from pregated_jax.loading import load_model

    config = get_preset("tiny")
    sm.write_bf16_checkpoint(config, tmp_path / "streamed", seed=3)
    save_pretrained(random_model(config.replace(dtype="bfloat16"), 3), tmp_path / "saved", dtype="bfloat16")
    a, b = (dict(nnx.to_flat_state(nnx.state(load_model(tmp_path / d), nnx.Param))) for d in ("streamed", "saved"))
    assert a.keys() == b.keys()
    for p in a:
        np.testing.assert_array_equal(np.asarray(a[p].get_value()), np.asarray(b[p].get_value()), err_msg=str(p))


@pytest.mark.slow
def test_measure_end_to_end_on_tiny(tmp_path):
    config, g = get_preset("tiny"), 16
    result = sm.measure("tiny", ("int8",), g, tmp_path / "work", log=lambda m: None)
    loads = result["loads"]
    assert set(loads) == {"bfloat16", "int8"} and result["baseline"]["ru_maxrss_bytes"] > 0
    for fmt, r in loads.items():
        assert r["ru_maxrss_bytes"] > 0 and r["VmRSS"] > 0 and r["disk_bytes"] > 0
        # the table's bytes: host-bound stacks are read in the compute dtype (bfloat16), or stay quantized
        assert r["expert_bytes"] == r["expected_expert_bytes"]
    bf16, int8 = _by_hand(config, "bfloat16", g), _by_hand(config, "int8", g)
    assert loads["int8"]["expert_bytes"] == int8 and loads["int8"]["expert_leaf_dtypes"] == ["float32", "int8"]
    assert int8 / bf16 == pytest.approx(0.5, abs=0.05)
    assert loads["bfloat16"]["expert_bytes"] == bf16 and loads["bfloat16"]["expert_leaf_dtypes"] == ["bfloat16"]
    assert "int8 store" in sm.markdown(result) and not (tmp_path / "work" / "tiny-int8").exists()
