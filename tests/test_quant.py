"""Quantized expert formats: round trips against a float64 numpy reference, sizes, and the errors."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pregated_jax import quant as Q
from pregated_jax.engine import EngineConfig

E, D_IN, D_OUT = 3, 64, 24


@pytest.fixture(scope="module")
def w():
    """[E, d_in, d_out] float32 with a wide range: one large weight per expert, and an all-zero column."""
    w = np.array(jax.random.normal(jax.random.key(0), (E, D_IN, D_OUT)), np.float32)
    w[:, 5, 3] = 9.0
    w[1, :, 7] = 0.0
    return w


def _reference_scales(w64, bound, group):
    """max|w| over each group of `group` input rows, per expert and output channel, / bound -> [E, n, d_out]."""
    e, d_in, d_out = w64.shape
    absmax = np.abs(w64).reshape(e, d_in // group, group, d_out).max(axis=2)
    scale = absmax / bound
    return np.where(scale < np.sqrt(np.finfo(np.float32).tiny), 1.0, scale)  # an all-zero group: scale 1


def _expand(scales, group):
    return np.repeat(scales, group, axis=1)  # [E, d_in, d_out]


def _unpack_reference(packed):
    """uint8 [E, r, n] -> int [E, 2r, n], nibbles read with numpy (independent of quant._unpack_int4)."""
    low, high = (packed & 0xF).astype(np.int64), (packed >> 4).astype(np.int64)
    low, high = np.where(low > 7, low - 16, low), np.where(high > 7, high - 16, high)
    out = np.empty((packed.shape[0], 2 * packed.shape[1], packed.shape[2]), np.int64)
    out[:, 0::2], out[:, 1::2] = low, high
    return out


@pytest.mark.parametrize("fmt,bound,qmax,group", [("int8", 127.5, 127, None), ("int4", 7.5, 7, 16)])
def test_integer_round_trip_matches_float64_reference(w, fmt, bound, qmax, group):
    """Scales = max|w| / (qmax + 1/2) per group; values = round(w / scale) clipped to [-qmax-1, qmax]; so every
    dequantized weight is within scale / 2 of the original (the largest lands on qmax: error exactly scale / 2)."""
    group = group or D_IN
    q = Q.quantize(w, fmt, group_size=group)
    w64 = w.astype(np.float64)
    ref_scales = _reference_scales(w64, bound, group)
    np.testing.assert_allclose(np.asarray(q.scales, np.float64), ref_scales, rtol=1e-6)
    values = (_unpack_reference(np.asarray(q.values)) if fmt == "int4" else np.asarray(q.values, np.int64))
    ratio = w64 / _expand(ref_scales, group)
    ref_values = np.clip(np.round(ratio), -qmax - 1, qmax)
    # a weight of -max|w| lands on the tie -(qmax + 1/2), which float32 may round either way: one step
    tie = np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) < 1e-4
    assert np.all((values == ref_values) | (tie & (np.abs(values - ref_values) == 1)))
    deq = np.asarray(Q.dequantize(q, jnp.float32), np.float64)
    step = _expand(np.asarray(q.scales, np.float64), group)
    # scale / 2 from rounding, plus float32's rounding of the scale (relative 2^-24) times |value| <= qmax + 1
    assert np.all(np.abs(deq - w64) <= step * (0.5 + (qmax + 1) * 2.0 ** -23))
    np.testing.assert_allclose(deq, values * step, rtol=1e-6)
    assert q.shape == w.shape and q.group_size == group and q.format == fmt


def test_float8_round_trip_matches_float64_reference(w):
    """Per-channel scale = max|w| / 448 (e4m3's largest value). e4m3 keeps 3 mantissa bits: a normal value
    rounds within 2^-4 of itself, a subnormal (spacing 2^-9) within 2^-10; in weight units that is
    |error| <= max(2^-4 |w|, 2^-10 scale)."""
    q = Q.quantize(w, "float8_e4m3fn")
    w64 = w.astype(np.float64)
    ref_scales = _reference_scales(w64, 448.0, D_IN)
    np.testing.assert_allclose(np.asarray(q.scales, np.float64), ref_scales, rtol=1e-6)
    assert q.values.dtype == jnp.float8_e4m3fn
    scale = _expand(np.asarray(q.scales, np.float64), D_IN)
    deq = np.asarray(Q.dequantize(q, jnp.float32), np.float64)
    bound = np.maximum(2.0 ** -4 * np.abs(w64), 2.0 ** -10 * scale) + 448 * 2.0 ** -23 * scale  # + float32 slack
    assert np.all(np.abs(deq - w64) <= bound)
    # the values are e4m3 numbers: casting them to float8 and back changes nothing
    v = np.asarray(q.values).astype(np.float64)
    np.testing.assert_array_equal(v.astype(ml_dtypes.float8_e4m3fn).astype(np.float64), v)


def test_bfloat16_is_the_identity_and_sizes_halve(w):
    assert Q.quantize(w, "bfloat16") is w
    i8, i4 = Q.quantize(w, "int8"), Q.quantize(w, "int4", group_size=16)
    assert i4.values.dtype == jnp.uint8 and i4.values.nbytes * 2 == i8.values.nbytes  # two values per byte
    assert i8.nbytes == E * (D_IN * D_OUT + D_OUT * 4)  # values + float32 scale per output channel
    assert i4.nbytes == E * (D_IN * D_OUT // 2 + D_IN // 16 * D_OUT * 4)
    # indexing the leading axis selects experts in every leaf
    np.testing.assert_array_equal(np.asarray(Q.dequantize(i4[1], jnp.float32)),
                                  np.asarray(Q.dequantize(i4, jnp.float32))[1])


def test_expert_bytes_at_switch_base_shapes():
    """Bytes one expert's wi [768, 3072] plus wo [3072, 768] takes, computed from shapes only."""
    d, ff = 768, 3072
    per = {f: Q.expert_nbytes(d, ff, f) + Q.expert_nbytes(ff, d, f) for f in Q.FORMATS}
    assert per["bfloat16"] == 2 * d * ff * 2  # 9,437,184
    assert per["int8"] == per["float8_e4m3fn"] == 2 * d * ff + (ff + d) * 4  # 4,733,952
    assert per["int4"] == d * ff + (d // 128 * ff + ff // 128 * d) * 4  # 2,506,752


def test_bad_formats_and_group_sizes_are_refused(w):
    with pytest.raises(ValueError, match=r"unknown expert dtype 'int3'; choose one of bfloat16, int8"):
        Q.quantize(w, "int3")
    with pytest.raises(ValueError, match="int4 group size 24 does not divide the experts' input dimension 64"):
        Q.quantize(w, "int4", group_size=24)
    with pytest.raises(ValueError, match="positive even integer, got 7"):
        Q.quantize(w, "int4", group_size=7)
    with pytest.raises(ValueError, match="unknown expert dtype 'fp8'"):
        EngineConfig(expert_dtype="fp8")
    with pytest.raises(ValueError, match="got 0"):
        EngineConfig(expert_group_size=0)
