"""The engine with quantized experts: every mode and copy path at one format generates gpu-only's tokens at
that format, host stacks and copies hold the quantized bytes, and the statistics count those bytes."""

import jax
import numpy as np
import pytest
from flax import nnx

from pregated_jax import native
from pregated_jax.config import get_preset
from pregated_jax.engine import InferenceEngine
from pregated_jax.model import SwitchTransformer
from pregated_jax.quant import QuantizedExperts

IDS = np.asarray(jax.random.randint(jax.random.key(1), (3, 9), 2, 128))
MASK = np.array([[1] * 9, [1] * 6 + [0] * 3, [1] * 4 + [0] * 5])
GROUP = 16  # divides the tiny model's d_model 32 and d_ff 64
STEPS = 5


@pytest.fixture(scope="module")
def model(tiny_pregated):
    return tiny_pregated


def run(model, fmt, **kw):
    generate = {k: kw.pop(k) for k in ("num_beams",) if k in kw}
    engine = InferenceEngine(model, expert_dtype=fmt, expert_group_size=GROUP, **kw)
    with jax.transfer_guard("disallow"):  # no implicit host<->device copy anywhere
        return engine, engine.generate(IDS, MASK, max_new_tokens=STEPS, **generate)


def expert_bytes(fmt, d=32, ff=64):
    """One expert's wi [d, ff] + wo [ff, d], values and float32 scales, by hand."""
    if fmt in ("int8", "float8_e4m3fn"):  # one byte per value, a float32 scale per output channel
        return 2 * d * ff + (ff + d) * 4
    return d * ff + (d // GROUP * ff + ff // GROUP * d) * 4  # int4: half a byte per value


def test_native_copies_move_the_quantized_bytes(model):
    """int4: pregated mode through the native copies (XLA's where the library is missing) equals gpu-only,
    and its statistics count each copied expert at int4's size."""
    _, ref = run(model, "int4", mode="gpu-only")
    _, res = run(model, "int4", mode="pregated", copy_method="dma" if native.available() else "xla")
    np.testing.assert_array_equal(res.tokens, ref.tokens)
    assert res.stats.bytes_moved == res.stats.experts_copied * expert_bytes("int4") > 0
    assert res.stats.expert_dtype == "int4"


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["int8", "int4", "float8_e4m3fn"])
def test_every_mode_and_copy_path_equals_gpu_only_at_the_format(model, fmt):
    engine, ref = run(model, fmt, mode="gpu-only")
    stack = engine.program.encoder.blocks[1].host_wi
    assert isinstance(stack, QuantizedExperts) and stack.format == fmt
    assert engine.expert_bytes == expert_bytes(fmt)
    variants = {
        "on-demand": dict(mode="on-demand"),
        "prefetch-all": dict(mode="prefetch-all"),
        "pregated": dict(mode="pregated"),
        "pregated, lru cache": dict(mode="pregated", cache_policy="lru", cache_experts=3),
        "pregated, prefill streamed in chunks": dict(mode="pregated", prefill_chunk=3),
        "pregated, whole-block prefill": dict(mode="pregated", prefill_routed_only=False),
        "pregated, first-block guess": dict(mode="pregated", guess_first_block=True),
    }
    if native.available():
        variants["pregated, native copies"] = dict(mode="pregated", copy_method="dma")
    for name, kw in variants.items():
        engine, res = run(model, fmt, **kw)
        np.testing.assert_array_equal(res.tokens, ref.tokens, err_msg=name)
        s = res.stats
        assert s.experts_copied > 0 and s.bytes_moved == s.experts_copied * expert_bytes(fmt), name
    # prefetch-all copies every expert of every MoE block: encoder blocks once, decoder blocks every step
    _, every = run(model, fmt, mode="prefetch-all")
    cfg = model.config
    copies = 8 * (len(cfg.sparse_blocks("encoder")) + len(cfg.sparse_blocks("decoder")) * STEPS)
    assert every.stats.experts_copied == copies and every.stats.bytes_moved == copies * expert_bytes(fmt)


@pytest.mark.slow
def test_beam_search_and_speculative_mode_equal_gpu_only_at_int4():
    """Beam search (batch 3 x 2 beams) in pregated and on-demand modes, and speculative mode on a
    conventional model, against gpu-only at int4."""
    pre = SwitchTransformer(get_preset("tiny", routing="pregated", num_experts=8, expert_capacity=6),
                            rngs=nnx.Rngs(0))
    _, ref = run(pre, "int4", mode="gpu-only", num_beams=2)
    for mode in ("pregated", "on-demand"):
        _, res = run(pre, "int4", mode=mode, num_beams=2)
        np.testing.assert_array_equal(res.tokens, ref.tokens, err_msg=mode)
    conv = SwitchTransformer(get_preset("tiny", num_experts=8, expert_capacity=6), rngs=nnx.Rngs(0))
    _, ref = run(conv, "int4", mode="gpu-only")
    _, res = run(conv, "int4", mode="speculative")
    np.testing.assert_array_equal(res.tokens, ref.tokens)


def test_a_group_size_that_does_not_divide_the_model_is_refused(model):
    with pytest.raises(ValueError, match="int4 group size 128 does not divide the experts' input dimension 32"):
        InferenceEngine(model, mode="gpu-only", expert_dtype="int4", expert_group_size=128)


def test_benchmark_pairs_each_format_with_gpu_only_at_that_format():
    """scripts/benchmark.py --expert_dtypes: a row's roofline takes gpu-only's decode time at the row's format."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("benchmark_script",
                                                  Path(__file__).resolve().parent.parent / "scripts" / "benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.parse_args(["--tiny", "--expert_dtypes", "bfloat16", "int8"])
    assert args.expert_dtypes == ["bfloat16", "int8"]
    assert bench.worker_config(args, "pregated", "int8").expert_dtype == "int8"
    with pytest.raises(SystemExit):
        bench.parse_args(["--tiny", "--expert_dtypes", "int3"])
    row = dict(impl="pregated-jax", preset="p", batch=1, num_beams=1, prefill_s=1.0, prefill_experts_copied=0,
               expert_bytes=1, decode_bytes_needed=0)
    rows = [dict(row, mode="gpu-only", decode_s=2.0),  # bfloat16 (rows before the axis carry no format)
            dict(row, mode="gpu-only", decode_s=1.0, expert_dtype="int8"),
            dict(row, mode="pregated", decode_s=3.0, expert_dtype="int8")]
    bench.add_ratios(rows)
    assert rows[2]["roofline_decode_s"] == 1.0 and rows[2]["decode_over_roofline"] == 3.0
