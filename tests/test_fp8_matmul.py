"""The fp8 grouped-matmul benchmark's variants compute the right product (vs a float64 per-token loop), and a
variant the backend refuses is reported as an error, not raised."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pregated_jax import quant
from pregated_jax.bench import fp8_matmul


def naive(x, w, group_sizes):
    """float64 y[t] = x[t] @ w[group(t)], tokens sorted by group."""
    y, t = [], 0
    for g, size in enumerate(group_sizes):
        for _ in range(size):
            y.append(np.asarray(x[t], np.float64) @ np.asarray(w[g], np.float64))
            t += 1
    return np.stack(y)


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(1)
    sizes = np.array([2, 0, 3, 1, 0, 4], np.int32)  # empty groups first, middle and last-but-one
    d_in, d_out = 64, 48
    x = jnp.asarray(rng.standard_normal((sizes.sum(), d_in), np.float32) * 3, jnp.bfloat16)  # [T, d_in]
    w32 = rng.standard_normal((len(sizes), d_in, d_out), np.float32) * d_in ** -0.5  # [G, d_in, d_out]
    w_fp8 = quant.quantize(w32, "float8_e4m3fn")
    assert w_fp8.values.dtype == jnp.float8_e4m3fn and w_fp8.scales.shape == (len(sizes), 1, d_out)
    return x, w32, w_fp8, sizes


def _relative(y, ref):
    return np.abs(np.asarray(y, np.float64) - ref).max() / np.abs(ref).max()


def test_bf16(problem):
    x, w32, _, sizes = problem
    w = jnp.asarray(w32, jnp.bfloat16)
    y = jax.jit(fp8_matmul.VARIANTS["bf16"][0])(x, w, jnp.asarray(sizes))
    assert y.shape == (sizes.sum(), w32.shape[2]) and y.dtype == jnp.bfloat16
    assert _relative(y, naive(x, w, sizes)) < 1e-2


@pytest.mark.parametrize("name", ["fp8-dequant", "fp8-native"])
def test_fp8(problem, name):
    x, w32, w_fp8, sizes = problem
    try:
        y = jax.jit(fp8_matmul.VARIANTS[name][0])(x, jax.device_put(w_fp8), jnp.asarray(sizes))
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"{name} not supported on {jax.default_backend()}: {e}")
    assert y.shape == (sizes.sum(), w32.shape[2]) and y.dtype == jnp.bfloat16
    dequantized = np.asarray(w_fp8.values).astype(np.float64) * np.asarray(w_fp8.scales, np.float64)
    err = _relative(y, naive(x, dequantized, sizes))
    assert err < (1e-2 if name == "fp8-dequant" else 0.1)  # native also rounds the activations to e4m3
    assert _relative(y, naive(x, w32, sizes)) < 0.1  # and stays close to the unquantized weights


def test_measure_reports_all_variants_with_small_errors():
    out = fp8_matmul.measure(d_in=32, d_out=16, num_experts=4, tokens=10, routed_experts=3, repeats=1, warmup=1)
    assert out["tokens"] == 10 and out["group_sizes_nonzero"] == 3
    for name, tol in (("bf16", 1e-2), ("fp8-dequant", 1e-2), ("fp8-native", 0.1)):
        v = out["variants"][name]
        if "error" in v:
            continue  # the backend refused it: reported, not raised
        assert v["ms"] > 0 and v["rel_err"] < tol, (name, v)


def test_refused_variant_is_an_error_entry(monkeypatch):
    def refused(x, w, group_sizes):
        raise NotImplementedError("fp8 ragged_dot is not supported here")

    monkeypatch.setitem(fp8_matmul.VARIANTS, "fp8-native", (refused, "fp8"))
    out = fp8_matmul.measure(d_in=16, d_out=8, num_experts=2, tokens=3, routed_experts=2, repeats=1, warmup=1)
    assert out["variants"]["fp8-native"] == {"error": "NotImplementedError: fp8 ragged_dot is not supported here"}
    assert "ms" in out["variants"]["bf16"]
    assert "error" in fp8_matmul.markdown_table([out])  # the table shows it too


def test_group_sizes_for():
    rng = np.random.default_rng(0)
    sizes = fp8_matmul.group_sizes_for(256, 128, 128, rng)
    assert sizes.sum() == 256 and (sizes >= 1).all()
    sizes = fp8_matmul.group_sizes_for(2, 8, 4, rng)
    assert sizes.sum() == 2 and (sizes[4:] == 0).all()
    assert (fp8_matmul.group_sizes_for(8, 8, 8, rng) == 1).all()
