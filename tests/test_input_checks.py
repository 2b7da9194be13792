"""Requests and engine settings refused on the host before anything runs: the memory a request needs against
the memory available, the device budget against what a mode needs, cache sizes, empty inputs and masks."""

import dataclasses
import time

import jax
import numpy as np
import pytest
from flax import nnx

from pregated_jax import memory
from pregated_jax.config import SwitchConfig, get_preset
from pregated_jax.engine import EngineConfig, InferenceEngine
from pregated_jax.generation import generate
from pregated_jax.model import SwitchTransformer

IDS = np.asarray(jax.random.randint(jax.random.key(1), (3, 9), 2, 128))
MASK = np.array([[1] * 9, [1] * 6 + [0] * 3, [1] * 4 + [0] * 5])
# tiny preset with 8 experts, float32: one expert is wi [32, 64] + wo [64, 32] float32 = 16,384 bytes
EXPERT = (32 * 64 + 64 * 32) * 4
MOE_BLOCKS = 4  # 2 encoder + 2 decoder MoE blocks


@pytest.fixture(scope="module")
def model():
    m = SwitchTransformer(get_preset("tiny", routing="pregated", num_experts=8, expert_capacity=6), rngs=nnx.Rngs(0))
    m.eval()
    return m


# --- the memory estimate -------------------------------------------------------------------------------

def test_estimate_equals_the_hand_computed_formula_and_the_caches_it_counts():
    cfg = get_preset("tiny")  # V 128, d 32, d_kv 8, ff 64, 4 heads, 4 decoder blocks, 4 experts, float32
    est = memory.estimate_request(cfg, batch=2, input_len=10, max_new_tokens=5, num_beams=3)  # 6 rows
    assert est.attention_scores == 4 * 2 * 4 * 10 * 10 * 4 == 12800
    assert est.encoder == 2 * 10 * (6 * 32 + 4 * 4 * 8 + 2 * 64) * 4 + 2 * 2 * 10 * 4 * 4 == 36480
    assert est.encoder_output == (2 + 6) * 10 * 32 * 4 == 10240
    assert est.cross_kv == 2 * 4 * 6 * 10 * 4 * 8 * 4 == 61440
    assert est.self_kv == 2 * 4 * 6 * 5 * 4 * 8 * 4 == 30720
    assert est.decode_step == 3 * 6 * 4 * 15 * 4 + 3 * 6 * 128 * 4 + 6 * (6 * 32 + 2 * 64) * 4 + 2 * 6 * 5 * 4 == 21456
    assert est.experts == 0 and est.workspace == 64 * 2 ** 20 + 173136 // 8
    assert est.total == 173136 + est.workspace
    half = memory.estimate_request(dataclasses.replace(cfg, dtype="bfloat16"), 2, 10, 5, 3)
    assert half.self_kv == est.self_kv // 2 and half.attention_scores == est.attention_scores  # scores: float32

    # the decoder caches are exactly the arrays the model allocates for them
    model = SwitchTransformer(cfg, rngs=nnx.Rngs(0))
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
    assert est.self_kv == nbytes(model.init_caches(6, 5))
    assert est.cross_kv == nbytes(model.cross_kv(np.zeros((6, 10, 32), np.float32)))


def test_the_default_models_usual_requests_are_estimated_below_a_gib():
    import json
    from pathlib import Path

    import pregated_jax
    cfg = SwitchConfig.from_hf_dict(json.loads(
        (Path(pregated_jax.__file__).parent / "assets/default_model/config.json").read_text()))
    assert memory.estimate_request(cfg, 8, 512, 64, 4).total < memory.GIB
    # 20k tokens: the [B, H, S, S] attention scores alone are 4 tensors x H heads x 20000^2 x 4 bytes
    assert memory.estimate_request(cfg, 1, 20000, 64).attention_scores == 4 * cfg.num_heads * 20000 ** 2 * 4


def test_available_memory_is_the_devices_free_bytes_or_the_hosts():
    class Gpu:
        def memory_stats(self):
            return {"bytes_limit": 1000, "bytes_in_use": 400}

    class Cpu:
        def memory_stats(self):
            return None

    free, where = memory.available_bytes(Gpu())
    assert free == 600 and "bytes_limit - bytes_in_use" in where
    free, where = memory.available_bytes(Cpu())
    with open("/proc/meminfo") as f:
        mem_available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    assert abs(free - mem_available) < 1 << 30 and "MemAvailable" in where


def test_a_request_that_does_not_fit_is_refused_before_anything_compiles(model, monkeypatch):
    """20k tokens need ~25.6 GB of attention scores alone; with 100 MB available, both generate functions
    refuse at once, stating the estimate and the available bytes, and nothing is compiled or dispatched."""
    monkeypatch.setattr(memory, "available_bytes", lambda device: (100_000_000, "test figure"))
    engine = InferenceEngine(model, mode="pregated")
    ids = np.full((1, 20000), 5, np.int32)

    def no_compile(*a, **k):
        raise AssertionError("dispatched a request that does not fit")

    import pregated_jax.engine.engine as engine_module
    import pregated_jax.generation as generation_module
    monkeypatch.setattr(generation_module, "_greedy", no_compile)
    monkeypatch.setattr(engine_module, "StackPass", no_compile)
    need = memory.estimate_request(model.config, 1, 20000, 8).total
    for call in (lambda: generate(model, ids, max_new_tokens=8), lambda: engine.generate(ids, max_new_tokens=8)):
        start = time.perf_counter()
        with pytest.raises(memory.RequestTooLargeError,
                           match=r"input length 20000.*needs about (\S+) GiB \((\d+) bytes.*attention_scores.*"
                                 r"only 0\.0931 GiB \(100000000 bytes\) is available \(test figure\)") as err:
            call()
        assert time.perf_counter() - start < 2
        stated = int(err.value.args[0].split("GiB (")[1].split(" bytes")[0])
        assert need <= stated < need * 1.01  # the engine adds its expert tables (a few KiB here)
    # a request that fits still runs
    monkeypatch.undo()
    assert engine.generate(IDS, MASK, max_new_tokens=2).tokens.shape == (3, 2)


# --- the device budget -----------------------------------------------------------------------------------

def test_a_negative_budget_and_bad_cache_sizes_are_refused(model):
    with pytest.raises(ValueError, match=r"device_budget_bytes must be >= 0 .*got -1"):
        EngineConfig(device_budget_bytes=-1)
    with pytest.raises(ValueError, match=r"cache_experts must be >= 1 .*got -3"):
        EngineConfig(cache_policy="lru", cache_experts=-3)
    with pytest.raises(ValueError, match=r"cache_experts=9 is more than the 8 experts of an MoE block: allowed 1 to 8"):
        InferenceEngine(model, mode="pregated", cache_policy="lru", cache_experts=9)
    assert InferenceEngine(model, mode="pregated", cache_policy="lru", cache_experts=8).cache_slots == 8


@pytest.mark.parametrize("mode, cache, minimum", [
    ("gpu-only", None, MOE_BLOCKS * 8 * EXPERT),  # every expert resident
    ("prefetch-all", None, 2 * 8 * EXPERT),  # two whole blocks
    ("on-demand", None, 4 * EXPERT),  # four one-expert streaming buffers
    ("pregated", None, 4 * EXPERT),
    ("pregated", {"cache_policy": "lru"}, MOE_BLOCKS * EXPERT + 4 * EXPERT),  # + one cache slot per block
    ("on-demand", {"cache_policy": "lfu", "cache_experts": 3}, MOE_BLOCKS * 3 * EXPERT + 4 * EXPERT),
])
def test_a_budget_below_what_the_mode_needs_is_refused_with_the_minimum(model, mode, cache, minimum):
    kw = cache or {}
    for budget in (1073, minimum - 1):  # --device_budget_gib 0.000001 is 1073 bytes
        with pytest.raises(ValueError, match=rf"device_budget_bytes={budget} \(.*GiB\) is below the {minimum} "
                                             rf"bytes .* that mode '{mode}' needs.*allowed: >= {minimum} bytes"):
            InferenceEngine(model, mode=mode, device_budget_bytes=budget, **kw)
    assert InferenceEngine(model, mode=mode, device_budget_bytes=minimum, **kw).min_budget_bytes == minimum


@pytest.mark.parametrize("cache", [None, "lru"])
def test_the_least_budget_generates_the_reference_within_it(model, cache):
    """At the minimum, the prefill streams one expert at a time, and decode steps whose slot tables would
    not fit (2 tables x 3 rows x one expert > 4 experts) stream too; the tokens do not change."""
    kw = {"cache_policy": cache} if cache else {}
    budget = (MOE_BLOCKS * EXPERT if cache else 0) + 4 * EXPERT
    engine = InferenceEngine(model, mode="pregated", device_budget_bytes=budget, **kw)
    assert engine.chunk == 1 and (engine.cache_slots == (1 if cache else None))
    assert engine.expert_buffer_bytes(IDS.size, 3) <= budget - (MOE_BLOCKS * EXPERT if cache else 0)
    if cache is None:
        assert engine.tables_exceed_budget(3) and not engine.tables_exceed_budget(2)
    rows = 1 if cache else 3  # one cache slot per block serves one row
    res = engine.generate(IDS[:rows], MASK[:rows], max_new_tokens=4)
    np.testing.assert_array_equal(res.tokens, generate(model, IDS, MASK, 4)[:rows])
    if cache is None:  # every MoE block streamed whole, in the prefill and in every decode step
        assert res.stats.experts_copied == (2 + 2 * res.stats.steps) * 8


def test_a_prefill_chunk_larger_than_the_budget_allows_is_refused(model):
    with pytest.raises(ValueError, match=r"prefill_chunk=2 needs 131072 bytes .* more than device_budget_bytes=100000; "
                                         r"allowed: at most 1 experts"):
        InferenceEngine(model, mode="pregated", device_budget_bytes=100000, prefill_chunk=2)


# --- empty inputs and masks ------------------------------------------------------------------------------

def test_empty_inputs_and_all_zero_mask_rows_are_refused(model):
    engine = InferenceEngine(model, mode="pregated")
    calls = {"generate": lambda ids, mask: generate(model, ids, mask, max_new_tokens=2),
             "engine.generate": lambda ids, mask: engine.generate(ids, mask, max_new_tokens=2)}
    for name, call in calls.items():
        for shape in ((1, 0), (0, 4)):
            with pytest.raises(ValueError, match=rf"input_ids has shape \({shape[0]}, {shape[1]}\): generation needs "
                                                 r"at least one row and one token per row"):
                call(np.zeros(shape, np.int32), None)
        mask = MASK.copy()
        mask[1] = 0
        with pytest.raises(ValueError, match=r"attention_mask row 1 is all zeros \(1 such row\(s\)\): every row needs "
                                             r"at least one real token"):
            call(IDS, mask)
