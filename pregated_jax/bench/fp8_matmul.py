"""Does the experts' grouped matmul run faster on fp8 weights consumed natively than dequantized to bfloat16?

The engine keeps float8_e4m3fn expert stacks (`quant.QuantizedExperts`: values [E, d_in, d_out], float32 scales
[E, 1, d_out]) and, inside the jitted block, dequantizes them to bfloat16 before `jax.lax.ragged_dot`
(`moe.py`). That materializes a bf16 copy of every routed expert's weights and then runs a bf16 matmul. Hopper
tensor cores multiply e4m3 x e4m3 directly, so quantizing the activations per token and feeding both fp8
operands to `ragged_dot` (float32 accumulation, scales applied to the output) could skip the copy and use the
faster fp8 units. This module times the expert FFN's first matmul, y[T, d_out] = x[T, d_in] @ w[group(t)]
(tokens sorted by expert, `group_sizes` [G]), three ways:

- "bf16":        ragged_dot(x_bf16, w_bf16)                                   (unquantized baseline)
- "fp8-dequant": ragged_dot(x_bf16, dequantize(w_fp8) as bf16)                 (what the engine does today)
- "fp8-native":  ragged_dot(x_fp8, w_fp8 values, float32) * sx[t] * scales[group(t)]
                 with a dynamic per-token scale sx = max|x[t]| / 448            (the candidate)

and reports each one's median time and its max abs error against float64 numpy references: the bf16 product
for "bf16", the product with the dequantized fp8 weights for both fp8 variants. A variant the backend
refuses (an fp8 `ragged_dot` XLA cannot compile there) is reported as {"error": ...} instead of a time.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pregated_jax import quant

E4M3_MAX = 448.0  # float8_e4m3fn's largest finite value

# Default cases: (model, d_model, d_ff) x matmul direction x token regime.
MODELS = (("switch-base-128", 768, 3072), ("switch-large-128", 1024, 4096))
# (regime, tokens, routed expert groups G); the weight stack holds the G routed experts.
REGIMES = (("decode", 1, 1), ("decode", 8, 8), ("prefill", 256, 128), ("prefill", 2048, 128))
TINY_MODELS = (("tiny", 64, 128),)
TINY_REGIMES = (("decode", 1, 1), ("decode", 4, 4), ("prefill", 32, 8))


def _bf16(x, w, group_sizes):
    """x bf16 [T, d_in], w bf16 [G, d_in, d_out], group_sizes int32 [G] -> bf16 [T, d_out]."""
    return jax.lax.ragged_dot(x, w, group_sizes)


def _fp8_dequant(x, w, group_sizes):
    """x bf16 [T, d_in], w QuantizedExperts fp8 [G, d_in, d_out] -> bf16 [T, d_out] (the engine's path)."""
    return jax.lax.ragged_dot(x, quant.dequantize(w, jnp.bfloat16), group_sizes)


def quantize_rows(x):
    """x [T, d] -> (x_q float8_e4m3fn [T, d], sx float32 [T]): x ~= x_q * sx[:, None], one scale per row."""
    x32 = x.astype(jnp.float32)  # [T, d]
    sx = jnp.max(jnp.abs(x32), axis=1) / E4M3_MAX  # [T]
    sx = jnp.where(sx > 0, sx, 1.0)  # an all-zero row: any scale, its values are 0
    return (x32 / sx[:, None]).astype(jnp.float8_e4m3fn), sx


def _fp8_native(x, w, group_sizes):
    """x bf16 [T, d_in], w QuantizedExperts fp8 [G, d_in, d_out] -> bf16 [T, d_out]: both operands in fp8,
    float32 accumulation, the activation and weight scales applied to the output."""
    tokens, groups = x.shape[0], group_sizes.shape[0]
    x_q, sx = quantize_rows(x)  # [T, d_in] fp8, [T]
    acc = jax.lax.ragged_dot(x_q, w.values, group_sizes, preferred_element_type=jnp.float32)  # [T, d_out]
    group_of_row = jnp.repeat(jnp.arange(groups), group_sizes, total_repeat_length=tokens)  # [T]
    w_scale = w.scales[group_of_row, 0, :]  # [T, d_out]
    return (acc * sx[:, None] * w_scale).astype(jnp.bfloat16)


# name -> (function, which weights it takes: "bf16" or "fp8")
VARIANTS: dict[str, tuple[Callable, str]] = {
    "bf16": (_bf16, "bf16"),
    "fp8-dequant": (_fp8_dequant, "fp8"),
    "fp8-native": (_fp8_native, "fp8"),
}
_JITTED: dict[str, tuple[Callable, Callable]] = {}  # name -> (function, its jit)


def _jitted(name: str) -> Callable:
    fn = VARIANTS[name][0]
    if _JITTED.get(name, (None, None))[0] is not fn:  # re-jit when a variant is replaced (tests)
        _JITTED[name] = (fn, jax.jit(fn))
    return _JITTED[name][1]


def group_sizes_for(tokens: int, num_experts: int, routed_experts: int, rng: np.random.Generator) -> np.ndarray:
    """int32 [num_experts] summing to `tokens`: the first `routed_experts` groups get the tokens (each at least
    one while tokens last, the rest at random), the others none."""
    sizes = np.zeros(num_experts, np.int64)
    routed = min(routed_experts, num_experts)
    base = min(routed, tokens)
    sizes[:base] = 1
    sizes[:routed] += rng.multinomial(tokens - base, np.full(routed, 1 / routed))
    return sizes.astype(np.int32)


def reference(x: np.ndarray, w: np.ndarray, group_sizes: np.ndarray) -> np.ndarray:
    """float64 y [T, d_out] = x [T, d_in] @ w[group(t)] ([G, d_in, d_out]), one group's rows at a time."""
    x = np.asarray(x, np.float64)
    y = np.zeros((x.shape[0], w.shape[2]), np.float64)
    start = 0
    for g, size in enumerate(np.asarray(group_sizes)):
        if size:
            y[start:start + size] = x[start:start + size] @ np.asarray(w[g], np.float64)
            start += size
    return y


def dequantized_f64(w: quant.QuantizedExperts) -> np.ndarray:
    """QuantizedExperts -> float64 [G, d_in, d_out] = values * scales, in numpy (independent of qwix)."""
    return np.asarray(w.values).astype(np.float64) * np.asarray(w.scales, np.float64)


def _time(fn: Callable, args: tuple, repeats: int, warmup: int) -> tuple[float, jax.Array]:
    """Median wall time of fn(*args) in ms over `repeats` calls after `warmup` untimed ones (>= 1: compile)."""
    out = None
    for _ in range(max(1, warmup)):
        out = jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), out


def measure(d_in: int, d_out: int, num_experts: int, tokens: int, routed_experts: int, repeats: int = 20,
            warmup: int = 3, seed: int = 0, variants=None) -> dict:
    """Times every variant on one shape; -> {"shape": ..., "variants": {name: {"ms", "max_abs_err",
    "rel_err"} or {"error"}}}. Errors are max |y - ref| over the output (rel_err: divided by max |ref|)."""
    rng = np.random.default_rng(seed)
    sizes = group_sizes_for(tokens, num_experts, routed_experts, rng)  # [E]
    x = jnp.asarray(rng.standard_normal((tokens, d_in), np.float32), jnp.bfloat16)  # [T, d_in]
    w32 = (rng.standard_normal((num_experts, d_in, d_out), np.float32) * d_in ** -0.5)  # [E, d_in, d_out]
    w_bf16 = jnp.asarray(w32, jnp.bfloat16)  # [E, d_in, d_out]
    w_fp8 = jax.device_put(quant.quantize(w32, "float8_e4m3fn"))  # values [E, d_in, d_out], scales [E, 1, d_out]
    group_sizes = jnp.asarray(sizes)  # [E]

    x64 = np.asarray(x, np.float64)
    refs = {"bf16": reference(x64, np.asarray(w_bf16, np.float64), sizes),  # [T, d_out]
            "fp8": reference(x64, dequantized_f64(w_fp8), sizes)}  # [T, d_out]
    weights = {"bf16": w_bf16, "fp8": w_fp8}
    results = {}
    for name in variants or VARIANTS:
        kind = VARIANTS[name][1]
        try:
            ms, y = _time(_jitted(name), (x, weights[kind], group_sizes), repeats, warmup)
        except Exception as e:  # noqa: BLE001 - the backend refused this variant (e.g. no fp8 ragged_dot)
            first_line = (str(e).splitlines() or [""])[0]
            results[name] = {"error": f"{type(e).__name__}: {first_line[:300]}"}
            continue
        diff = np.abs(np.asarray(y, np.float64) - refs[kind])
        scale = float(np.abs(refs[kind]).max()) or 1.0
        results[name] = {"ms": ms, "max_abs_err": float(diff.max()), "rel_err": float(diff.max()) / scale,
                         "reference": kind}
    return {"d_in": d_in, "d_out": d_out, "num_experts": num_experts, "tokens": tokens,
            "routed_experts": routed_experts, "group_sizes_nonzero": int((sizes > 0).sum()),
            "max_group_size": int(sizes.max()), "repeats": repeats, "warmup": warmup, "variants": results}


def default_cases(tiny: bool = False) -> list[dict]:
    """The cases run by default: per model, the wi (d_model -> d_ff) and wo (d_ff -> d_model) matmuls at
    every token regime; `tiny`: small shapes for a CPU smoke run."""
    cases = []
    for model, d_model, d_ff in TINY_MODELS if tiny else MODELS:
        for direction, d_in, d_out in (("wi", d_model, d_ff), ("wo", d_ff, d_model)):
            for regime, tokens, groups in TINY_REGIMES if tiny else REGIMES:
                cases.append({"model": model, "matmul": direction, "regime": regime, "d_in": d_in, "d_out": d_out,
                              "num_experts": groups, "tokens": tokens, "routed_experts": groups})
    return cases


def run_cases(cases: list[dict], repeats: int, warmup: int, on_case: Callable[[list[dict]], None] | None = None
              ) -> list[dict]:
    """measure() every case; -> the cases with their results merged in. `on_case(rows so far)` runs after each
    case (progress, partial results)."""
    keys = ("d_in", "d_out", "num_experts", "tokens", "routed_experts")
    rows = []
    for case in cases:
        rows.append({**case, **measure(**{k: case[k] for k in keys}, repeats=repeats, warmup=warmup)})
        if on_case:
            on_case(rows)
    return rows


def markdown_table(rows: list[dict]) -> str:
    """One line per case: each variant's ms (or "error") and fp8-native's speedup over fp8-dequant."""
    names = list(VARIANTS)
    head = ["model", "matmul", "regime", "T", "G", "d_in", "d_out", *[f"{n} ms" for n in names],
            "dequant/native", "dequant rel err", "native rel err"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        v = r["variants"]
        ms = [f"{v[n]['ms']:.4f}" if "ms" in v.get(n, {}) else "error" for n in names]
        deq, nat = v.get("fp8-dequant", {}), v.get("fp8-native", {})
        speedup = f"{deq['ms'] / nat['ms']:.2f}x" if "ms" in deq and "ms" in nat else "-"
        errs = [f"{e['rel_err']:.2e}" if "rel_err" in e else "-" for e in (deq, nat)]
        lines.append("| " + " | ".join([r.get("model", "-"), r.get("matmul", "-"), r.get("regime", "-"),
                                        str(r["tokens"]), str(r["routed_experts"]), str(r["d_in"]),
                                        str(r["d_out"]), *ms, speedup, *errs]) + " |")
    return "\n".join(lines)
