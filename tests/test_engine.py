"""The offload engine: every mode generates exactly the reference tokens, with no implicit transfer."""

import re
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pregated_jax.config import get_preset
from pregated_jax.engine import EngineConfig, InferenceEngine
from pregated_jax.generation import generate
from pregated_jax.model import SwitchTransformer
from hlo import custom_calls as _custom_calls
from hlo import early_table_readers
from hlo import start_tokens as _start_tokens

IDS = np.asarray(jax.random.randint(jax.random.key(1), (3, 9), 2, 128))
MASK = np.array([[1] * 9, [1] * 6 + [0] * 3, [1] * 4 + [0] * 5])


@pytest.fixture(scope="module", params=["conventional", "pregated"])
def model(request):
    # 8 experts so that decode steps (3 rows) fetch a few experts while prefill streams whole blocks.
    cfg = get_preset("tiny", routing=request.param, num_experts=8, expert_capacity=6)
    m = SwitchTransformer(cfg, rngs=nnx.Rngs(0))
    m.eval()
    return m


def modes_for(model):
    if model.config.routing == "conventional":
        return ["gpu-only", "on-demand", "prefetch-all", "speculative"]
    return ["gpu-only", "on-demand", "prefetch-all", "pregated"]


def run(engine, **kw):
    with jax.transfer_guard("disallow"):  # no implicit host<->device copy anywhere in the loop
        return engine.generate(IDS, MASK, **kw)


def test_greedy_every_mode_equals_reference(model):
    ref = generate(model, IDS, MASK, 7)
    for mode in modes_for(model):
        res = run(InferenceEngine(model, mode=mode), max_new_tokens=7)
        np.testing.assert_array_equal(res.tokens, ref, err_msg=mode)


@pytest.mark.parametrize("policy", ["lru", "lfu", "lifo", "fifo"])
def test_cache_policies_do_not_change_tokens(model, policy):
    ref = generate(model, IDS, MASK, 7)
    mode = "speculative" if model.config.routing == "conventional" else "pregated"
    engine = InferenceEngine(model, mode=mode, cache_policy=policy, cache_experts=3)
    res = run(engine, max_new_tokens=7)
    np.testing.assert_array_equal(res.tokens, ref)
    s = res.stats
    assert s.cache_misses == s.experts_copied - _prefill_copies(engine) and s.cache_hits > 0


def _prefill_copies(engine):
    """Prefill streams every expert of each encoder MoE block once (dense call, no cache)."""
    return len(engine.program.encoder.moe_blocks) * engine.num_experts


def test_bounded_prefill_stream_equals_reference(model):
    ref = generate(model, IDS, MASK, 5)
    mode = "speculative" if model.config.routing == "conventional" else "pregated"
    res = run(InferenceEngine(model, mode=mode, prefill_chunk=3), max_new_tokens=5)
    np.testing.assert_array_equal(res.tokens, ref)


@pytest.mark.slow
def test_beam_search_same_in_every_mode_and_matches_naive(model):
    ref = naive_beams(model)
    for mode in modes_for(model):
        res = run(InferenceEngine(model, mode=mode), max_new_tokens=5, num_beams=3)
        np.testing.assert_array_equal(res.tokens, ref, err_msg=mode)


def test_statistics_count_copies(model):
    steps = 4
    gpu = run(InferenceEngine(model, mode="gpu-only"), max_new_tokens=steps).stats
    assert gpu.experts_copied == 0 and gpu.steps == steps and gpu.new_tokens == 3 * steps
    every = run(InferenceEngine(model, mode="prefetch-all"), max_new_tokens=steps).stats
    e, enc, dec = 8, len(model.config.sparse_blocks("encoder")), len(model.config.sparse_blocks("decoder"))
    assert every.experts_copied == e * (enc + dec * steps)
    assert every.bytes_moved == every.experts_copied * 2 * model.config.d_model * model.config.d_ff * 4
    d = every.as_dict()
    assert d["decode_tokens_per_s"] > 0 and d["h2d_gb_per_s"] > 0


def test_prefill_copies_exactly_the_routed_experts(model):
    """Dense calls copy the distinct experts the (pre-)gates routed kept tokens to, per encoder MoE block
    (reference: the plain model's decisions); with prefill_routed_only=False, whole blocks."""
    _, decisions = model.encode(jnp.asarray(IDS), jnp.asarray(MASK))
    routed = sum(len(set(np.asarray(d.expert_index)[np.asarray(d.keep)].tolist())) for d in decisions)
    assert 0 < routed < len(decisions) * 8  # the tiny model leaves some experts unrouted
    modes = ["on-demand"] + (["pregated"] if model.config.routing == "pregated" else [])
    for mode in modes:
        s = run(InferenceEngine(model, mode=mode), max_new_tokens=2).stats
        assert s.prefill_experts_copied == routed, mode
        whole = run(InferenceEngine(model, mode=mode, prefill_routed_only=False), max_new_tokens=2).stats
        assert whole.prefill_experts_copied == len(decisions) * 8, mode


def test_speculative_reports_hit_rate():
    cfg = get_preset("tiny", num_experts=8)
    m = SwitchTransformer(cfg, rngs=nnx.Rngs(0))
    m.eval()
    s = run(InferenceEngine(m, mode="speculative"), max_new_tokens=4).stats
    # decode: per step, every decoder MoE block after the first is predicted for 3 rows; prefill: every
    # encoder MoE block after the first, for at most its 8 experts
    most = 3 * 4 * (len(cfg.sparse_blocks("decoder")) - 1) + 8 * (len(cfg.sparse_blocks("encoder")) - 1)
    assert 0 < s.speculative_needed <= most
    assert 0 <= s.speculative_hits <= s.speculative_needed


def test_engine_rejects_wrong_mode_and_sizes():
    conv = SwitchTransformer(get_preset("tiny"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="needs a pre-gated model"):
        InferenceEngine(conv, mode="pregated")
    with pytest.raises(ValueError, match="unknown engine mode"):
        InferenceEngine(conv, mode="teleport")
    with pytest.raises(ValueError, match="a cache does not apply"):
        InferenceEngine(conv, mode="gpu-only", cache_policy="lru", cache_experts=2)
    with pytest.raises(ValueError, match="cache needs a size"):
        InferenceEngine(conv, mode="on-demand", cache_policy="lru")
    small = InferenceEngine(conv, mode="on-demand", cache_policy="lru", cache_experts=1)
    with pytest.raises(ValueError, match="cache_experts=1"):
        small.generate(IDS, MASK, max_new_tokens=2)


_NAIVE_BEAMS = {}


def naive_beams(model):
    """naive_beam_search(model, IDS, MASK, beams=3, steps=5), computed once per model (it is slow)."""
    if id(model) not in _NAIVE_BEAMS:
        _NAIVE_BEAMS[id(model)] = (model, naive_beam_search(model, IDS, MASK, beams=3, steps=5))
    return _NAIVE_BEAMS[id(model)][1]


def naive_beam_search(model, ids, mask, beams, steps):
    """Same algorithm as the engine, written plainly: full recompute of the decoder for every beam."""
    cfg = model.config
    out = []
    for b in range(ids.shape[0]):
        hyps = [([], 0.0, False)]  # (tokens, score, finished)
        for _ in range(steps):
            cands = []
            for toks, score, done in hyps:
                if done:
                    cands.append((toks + [cfg.pad_token_id], score, True))
                    continue
                dec = jnp.asarray([[cfg.decoder_start_token_id] + toks])
                logits = model(jnp.asarray(ids[b:b + 1]), dec, jnp.asarray(mask[b:b + 1]))[0, -1]
                logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)))
                for tok in np.argsort(-logp, kind="stable")[:beams]:
                    cands.append((toks + [int(tok)], score + float(logp[tok]), int(tok) == cfg.eos_token_id))
            cands.sort(key=lambda c: -c[1])
            hyps = cands[:beams]
        length = lambda t: (t.index(cfg.eos_token_id) + 1) if cfg.eos_token_id in t else len(t)  # noqa: E731
        out.append(max(hyps, key=lambda h: h[1] / length(h[0]))[0])
    return np.array(out)


@pytest.mark.parametrize("cache", [None, "lfu"])
def test_fused_step_equals_block_by_block_dispatch(model, cache):
    """The single-jit decode step and the per-block reference path agree on tokens and on every copy."""
    mode = "speculative" if model.config.routing == "conventional" else "pregated"
    kw = dict(cache_policy=cache, cache_experts=6) if cache else {}
    fused = run(InferenceEngine(model, mode=mode, **kw), max_new_tokens=5, num_beams=2)
    eager = run(InferenceEngine(model, mode=mode, **kw), max_new_tokens=5, num_beams=2, fused=False)
    np.testing.assert_array_equal(fused.tokens, eager.tokens)
    for field in ("experts_copied", "prefill_experts_copied", "cache_hits", "cache_misses",
                  "speculative_hits", "speculative_needed", "speculative_wasted"):
        assert getattr(fused.stats, field) == getattr(eager.stats, field), field


COPY_COUNTERS = ("experts_copied", "prefill_experts_copied", "speculative_hits", "speculative_needed",
                 "speculative_wasted")


@pytest.mark.slow
def test_dma_copies_generate_the_reference_with_the_same_statistics(model):
    """copy_method="dma" (the native custom calls) in every mode: the reference tokens, greedy and beam
    search, and the same copy and speculation counters as XLA's copies."""
    ref, beam_ref = generate(model, IDS, MASK, 7), naive_beams(model)
    for mode in modes_for(model):
        dma = InferenceEngine(model, mode=mode, copy_method="dma")
        # modes that copy nothing routed (resident experts, whole blocks) keep XLA's copies
        method = "xla" if mode in ("gpu-only", "prefetch-all") else "dma"
        assert (dma.copy_method, dma.miss_copy_method) == (method, method), mode
        greedy = run(dma, max_new_tokens=7)
        np.testing.assert_array_equal(greedy.tokens, ref, err_msg=mode)
        assert greedy.stats.copy_method == method, mode
        if method == "dma":  # (otherwise the same engine as copy_method="xla")
            xla = run(InferenceEngine(model, mode=mode, copy_method="xla"), max_new_tokens=7)
            for field in COPY_COUNTERS:
                assert getattr(greedy.stats, field) == getattr(xla.stats, field), (mode, field)
            assert greedy.stats.experts_copied > greedy.stats.prefill_experts_copied > 0, mode
        beams = run(dma, max_new_tokens=5, num_beams=3)
        np.testing.assert_array_equal(beams.tokens, beam_ref, err_msg=mode)


def _compiled_decode_step(engine) -> str:
    """Compiled HLO text of the engine's fused decode step, as one greedy token at batch 1 calls it."""
    step, captured = engine._decode_step, []
    engine._decode_step = lambda *args: captured.append(args) or step(*args)
    engine.generate(IDS[:1], MASK[:1], max_new_tokens=1)
    return step.lower(*captured[0]).compile().as_text()


def _tiny_dma_engine(routing: str, guess_first_block: bool, steps_per_call: int = 1) -> InferenceEngine:
    """A tiny engine with DMA copies, one step per dispatch unless said: pregated mode, or speculative for a
    conventional model."""
    cfg = get_preset("tiny", routing=routing, num_experts=8, expert_capacity=6)
    return InferenceEngine(SwitchTransformer(cfg, rngs=nnx.Rngs(0)), copy_method="dma",
                           decode_steps_per_call=steps_per_call, mode="pregated" if routing == "pregated" else "speculative",
                           guess_first_block=guess_first_block)


@pytest.mark.parametrize("routing", ["pregated", "conventional"])
@pytest.mark.parametrize("steps_per_call", [1, 4])
def test_no_table_in_flight_is_read_before_its_wait(routing, steps_per_call):
    """The native copies fill a start's tables behind XLA's back: in the compiled decode step (one step, or a
    loop of steps whose carry holds the next step's guess) nothing but the done reads them. An XLA copy of an
    in-flight table into a loop carry or an aliased output would read it before its transfers land."""
    hlo = _compiled_decode_step(_tiny_dma_engine(routing, guess_first_block=True, steps_per_call=steps_per_call))
    assert _custom_calls(hlo, "pgj_fetch_start")
    assert early_table_readers(hlo) == []


@pytest.mark.parametrize("steps_per_call", [1, 4])
def test_staged_guess_crosses_the_step_in_flight_and_after_its_collection(steps_per_call):
    """With guess_staging, the compiled decode step starts the next step's guess with a staged start (no
    table of XLA's in flight) that takes the collected incoming guess as an operand: the staging area is
    reused only once its rows were copied out. The step collects one staged guess and starts one."""
    cfg = get_preset("tiny", routing="pregated", num_experts=8, expert_capacity=6)
    engine = InferenceEngine(SwitchTransformer(cfg, rngs=nnx.Rngs(0)), copy_method="dma", mode="pregated",
                             decode_steps_per_call=steps_per_call, guess_first_block=True, guess_staging=True)
    hlo = _compiled_decode_step(engine)
    (start, start_ops), = _custom_calls(hlo, "pgj_stage_start")
    (done, _), = _custom_calls(hlo, "pgj_stage_done")
    # the done's results (its tuple's elements) are operands of the start
    done_outputs = set(re.findall(r"%(\S+) = \S+ get-tuple-element\(%" + re.escape(done) + r"\), index=\d+", hlo))
    assert done_outputs & set(start_ops), (start_ops, done_outputs)
    assert early_table_readers(hlo) == []


def test_guess_staging_needs_the_guess_and_the_native_copies():
    with pytest.raises(ValueError, match="needs guess_first_block=True"):
        EngineConfig(guess_staging=True)
    with pytest.raises(ValueError, match="needs the native copies.*copy_method='xla'"):
        EngineConfig(guess_first_block=True, guess_staging=True, copy_method="xla")
    cfg = get_preset("tiny", routing="pregated", num_experts=8, expert_capacity=6)
    model = SwitchTransformer(cfg, rngs=nnx.Rngs(0))
    if jax.devices()[0].platform == "cpu":  # "auto" resolves to XLA's copies off the GPU
        with pytest.raises(ValueError, match="resolved to 'xla'"):
            InferenceEngine(model, guess_first_block=True, guess_staging=True)
    # a mode that never guesses ignores the setting (a benchmark sweeps modes with one set of engine flags)
    gpu_only = InferenceEngine(model, mode="gpu-only", guess_first_block=True, guess_staging=True)
    assert gpu_only.guess_staging_key is None and gpu_only._first_guess(1) is None


@pytest.mark.parametrize("routing", ["pregated", "conventional"])
def test_dma_first_block_fetch_is_queued_before_the_next_prefetch(routing):
    """In the fused decode step, the first MoE block has no prefetch: its own fetch must reach the copy stream
    before the next block's prefetch, or it waits behind those copies. XLA orders independent custom calls
    as it likes, so the prefetch's start must take the own start's token as an operand."""
    hlo = _compiled_decode_step(_tiny_dma_engine(routing, guess_first_block=False))
    starts = _custom_calls(hlo, "pgj_fetch_start")
    tokens = _start_tokens(hlo)
    names = [name for name, _ in starts]
    # the decoder of the tiny model has 2 MoE blocks: block 1's own fetch, block 2's prefetch (+ misses)
    own, prefetch = names[0], names[1]
    assert [tokens.get(o) for o in dict(starts)[prefetch]][1:] == [own], starts
    # and block 1's wait comes after block 2's start (the copies overlap block 1's computation): the done
    # of block 1's own fetch (operands: 2 tables, ids, its start's token, then what it must follow)
    done = _custom_calls(hlo, "pgj_fetch_done")
    own_done = [ops for _, ops in done if tokens.get(ops[3]) == own]
    assert len(own_done) == 1 and prefetch in [tokens.get(o) for o in own_done[0][4:]], done


@pytest.mark.parametrize("routing", ["pregated", "conventional"])
def test_dma_next_step_guess_queues_behind_the_last_prefetch(routing):
    """With guess_first_block, a decode step receives its guess as a finished table (the previous step waited
    for it at its end): the first block's misses start first, the next block's prefetch queues behind them,
    and the next step's guess behind the stack's last prefetch, issued before the computation of the block
    that started it (that block's wait takes its token); the next guess's own wait is the step's last."""
    hlo = _compiled_decode_step(_tiny_dma_engine(routing, guess_first_block=True))
    starts = _custom_calls(hlo, "pgj_fetch_start")
    tokens = _start_tokens(hlo)
    # the decoder of the tiny model has 2 MoE blocks: block 1's misses, block 2's prefetch, the next guess
    # (then, in speculative mode, block 2's mispredicted experts, after its gate)
    assert len(starts) == (3 if routing == "pregated" else 4), starts
    (missed, missed_ops), (prefetch, prefetch_ops), (next_guess, next_ops) = starts[:3]
    assert len(missed_ops) == 1, (missed_ops, "the incoming guess has landed: nothing to queue behind")
    assert [tokens.get(o) for o in prefetch_ops][1:] == [missed], starts
    assert [tokens.get(o) for o in next_ops][1:] == [prefetch], starts
    done = _custom_calls(hlo, "pgj_fetch_done")
    waits_for = [tokens.get(ops[3]) for _, ops in done]  # the start each done waits for, in schedule order
    assert sorted(waits_for) == sorted(name for name, _ in starts), done
    # block 1's wait (its misses) follows both starts made before its computation; the guess's wait comes last
    missed_done = done[waits_for.index(missed)][1]
    assert {prefetch, next_guess} <= {tokens.get(o) for o in missed_done[4:]}, missed_done
    assert waits_for[-1] == next_guess, waits_for


@pytest.mark.slow
def test_first_block_guess_statistics_match_a_replay_of_the_routing():
    """Pre-gated model, batch 3, greedy: the guess for step t is the first decoder MoE block's experts of step
    t-1. Hits, needed and wasted against a replay of that block's routing, taken from the plain model's
    teacher-forced decoder pass over the generated tokens; the tokens equal the reference with and without
    the guess, in the fused and the block-by-block paths, with both copy methods."""
    cfg = get_preset("tiny", routing="pregated", num_experts=8, expert_capacity=6)
    model = SwitchTransformer(cfg, rngs=nnx.Rngs(0))
    steps = 5
    ref = generate(model, IDS, MASK, steps)
    enc, _ = model.encode(jnp.asarray(IDS), jnp.asarray(MASK))
    inputs = np.concatenate([np.full((3, 1), cfg.decoder_start_token_id), ref[:, :-1]], axis=1)
    _, decisions = model.decode(jnp.asarray(inputs, jnp.int32), enc, jnp.asarray(MASK))
    routed = np.asarray(decisions[0].expert_index).reshape(3, steps)  # [rows, steps], top-1
    assert np.asarray(decisions[0].keep).all()  # 3 rows x 1 token per step: nothing dropped
    needed = [set(routed[:, t].tolist()) for t in range(steps)]
    previous = [set()] + needed[:-1]
    hits = sum(len(n & p) for n, p in zip(needed, previous))
    wasted = sum(len(p - n) for n, p in zip(needed, previous))
    assert 0 < hits < sum(map(len, needed))  # the replay has hits and misses
    staged = dict(copy_method="dma", guess_staging=True)
    for kw in (dict(), dict(copy_method="dma"), dict(decode_steps_per_call=1), dict(fused=False), staged,
               dict(staged, decode_steps_per_call=1), dict(staged, fused=False)):
        fused, staging = kw.pop("fused", True), kw.pop("guess_staging", False)
        res = run(InferenceEngine(model, mode="pregated", guess_first_block=True, guess_staging=staging, **kw),
                  max_new_tokens=steps, fused=fused)
        np.testing.assert_array_equal(res.tokens, ref, err_msg=str(kw))
        s = res.stats
        assert (s.speculative_hits, s.speculative_needed, s.speculative_wasted) == (
            hits, sum(map(len, needed)), wasted), kw
        off = run(InferenceEngine(model, mode="pregated", **kw), max_new_tokens=steps, fused=fused).stats
        assert off.speculative_needed is None
        # the guess copies `wasted` experts more; the bytes that must move do not change
        assert s.experts_copied == off.experts_copied + wasted, kw
        assert s.as_dict()["decode_bytes_needed"] == off.as_dict()["decode_bytes_moved"], kw


@pytest.mark.parametrize("guess", [False, True, "staged"])
def test_dma_fused_step_equals_block_by_block_dispatch(model, guess):
    """With copy_method="dma", the fused decode step (start/done inside one jit) and the per-block path
    (eager start and donated finish) agree on tokens and counters, with and without the first block's guess
    (landed within its step, or staged across steps), and give the reference beams."""
    mode = "speculative" if model.config.routing == "conventional" else "pregated"
    kw = dict(copy_method="dma", guess_first_block=bool(guess), guess_staging=guess == "staged")
    fused = run(InferenceEngine(model, mode=mode, **kw), max_new_tokens=5, num_beams=3)
    eager = run(InferenceEngine(model, mode=mode, **kw), max_new_tokens=5, num_beams=3, fused=False)
    np.testing.assert_array_equal(fused.tokens, naive_beams(model))
    np.testing.assert_array_equal(fused.tokens, eager.tokens)
    for field in COPY_COUNTERS:
        assert getattr(fused.stats, field) == getattr(eager.stats, field), field
    assert fused.stats.experts_copied > 0


def test_dma_fetches_with_xla_speculative_misses(model):
    """What copy_method="auto" does on a GPU in speculative mode: routed fetches through the native calls,
    the fetches of mispredicted experts through XLA's copies."""
    if model.config.routing != "conventional":
        pytest.skip("mispredicted experts exist only in speculative mode (conventional models)")
    mixed = InferenceEngine(model, mode="speculative", copy_method="dma")
    mixed.miss_copy_method = "xla"
    res = run(mixed, max_new_tokens=7)
    np.testing.assert_array_equal(res.tokens, generate(model, IDS, MASK, 7))
    xla = run(InferenceEngine(model, mode="speculative", copy_method="xla"), max_new_tokens=7)
    for field in COPY_COUNTERS:
        assert getattr(res.stats, field) == getattr(xla.stats, field), field
    assert res.stats.speculative_needed > res.stats.speculative_hits  # some misses were fetched
    assert res.stats.copy_method == "dma, speculative misses: xla"


def test_copy_method_is_checked_and_resolved(model):
    with pytest.raises(ValueError, match="unknown copy method 'teleport'"):
        EngineConfig(copy_method="teleport")
    with pytest.raises(ValueError, match="unknown copy method 'teleport'"):
        InferenceEngine(model, mode="on-demand", copy_method="teleport")
    for method in ("xla", "dma"):
        e = InferenceEngine(model, EngineConfig(mode="on-demand", copy_method=method))
        assert (e.copy_method, e.miss_copy_method) == (method, method)
    if jax.devices()[0].platform != "cpu":
        pytest.skip("'auto' resolves to XLA's copies only off the GPU")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # on the CPU, "auto" picks XLA's copies without complaint
        auto = InferenceEngine(model, mode="on-demand")
    assert auto.config.copy_method == "auto"
    assert (auto.copy_method, auto.miss_copy_method) == ("xla", "xla")


@pytest.mark.parametrize("num_beams,cache", [(1, None), (2, None), (1, "lru")])
@pytest.mark.slow
def test_several_decode_steps_per_call_change_nothing(model, num_beams, cache):
    """A fori_loop of 3 steps per dispatch (7 tokens: 3 + 3 + 1) against one step per dispatch, every mode."""
    for mode in modes_for(model):
        if cache and mode in ("gpu-only", "prefetch-all"):
            continue
        kw = dict(cache_policy=cache, cache_experts=6) if cache else {}
        one = run(InferenceEngine(model, mode=mode, decode_steps_per_call=1, **kw), max_new_tokens=7,
                  num_beams=num_beams)
        three = run(InferenceEngine(model, mode=mode, decode_steps_per_call=3, **kw), max_new_tokens=7,
                    num_beams=num_beams)
        np.testing.assert_array_equal(three.tokens, one.tokens, err_msg=mode)
        for field in ("steps", "experts_copied", "prefill_experts_copied", "cache_hits", "cache_misses",
                      "speculative_hits", "speculative_needed"):
            assert getattr(three.stats, field) == getattr(one.stats, field), (mode, field)


def test_static_graphdef_hashes_once_and_compares_by_value(model):
    """jit hashes static arguments on every call: `Static` must hash its graphdef once, yet two wrappers of
    equal graphdefs (two engines over the same config) must still be equal, so that they share compilations."""
    from pregated_jax.engine.placement import Static

    class CountingHash:
        def __init__(self, value):
            self.value, self.calls = value, 0

        def __hash__(self):
            self.calls += 1
            return hash(self.value)

        def __eq__(self, other):
            return isinstance(other, CountingHash) and self.value == other.value

    inner = CountingHash("graph")
    wrapped = Static(inner)
    for _ in range(5):
        hash(wrapped)
    assert inner.calls == 1
    a = InferenceEngine(model, mode="gpu-only").program.decoder.blocks[0].graphdef
    b = InferenceEngine(model, mode="gpu-only").program.decoder.blocks[0].graphdef
    assert a is not b and a == b and hash(a) == hash(b)
    blocks = InferenceEngine(model, mode="gpu-only").program.decoder.blocks
    dense, sparse = next(x for x in blocks if not x.is_sparse), next(x for x in blocks if x.is_sparse)
    assert dense.graphdef != sparse.graphdef  # a dense FFN block and an MoE block never share a compilation


@pytest.mark.slow
def test_generation_stops_once_every_row_finished():
    """EOS at the first token. One step per dispatch: the host stops one dispatch after the first
    finished-check (every `check_every` steps; its flag is read while the next dispatch runs). Several
    steps per dispatch: the loop inside the dispatch stops after the EOS step. stop_when_finished=False runs
    every step. The output is EOS then padding in every case."""
    base = get_preset("tiny", routing="pregated", num_experts=8, expert_capacity=6)
    first = run(InferenceEngine(SwitchTransformer(base, rngs=nnx.Rngs(0)), mode="pregated"), max_new_tokens=1)
    eos = int(first.tokens[0, 0])
    ids, mask = IDS[:1], MASK[:1]
    model = SwitchTransformer(base.replace(eos_token_id=eos), rngs=nnx.Rngs(0))  # same weights, new EOS
    # (4, True): dispatches of 4, 4 and 1 steps; the last one, queued after every row finished, runs none
    for per_call, stop, steps in ((1, True, 3), (3, True, 1), (4, True, 1), (4, False, 9), (1, False, 9)):
        engine = InferenceEngine(model, mode="pregated", check_every=2, decode_steps_per_call=per_call,
                                 stop_when_finished=stop)
        with jax.transfer_guard("disallow"):
            res = engine.generate(ids, mask, max_new_tokens=9)
        assert res.stats.steps == steps, (per_call, stop)
        np.testing.assert_array_equal(res.tokens[0], [eos] + [base.pad_token_id] * 8)


@pytest.mark.parametrize("fused", [True, False])
def test_first_decode_dispatch_is_queued_before_the_host_waits_for_the_prefill(fused, monkeypatch):
    """Fused decoding queues its first dispatch before the host blocks on the prefill's output, so the device
    never idles while the host dispatches; the prefill's latency is read right after it. Block-by-block
    decoding waits as it goes, so there the prefill is timed before any decode work. Either way the prefill
    and decode times add up to the run's wall time, and the counts stay those of the other path."""
    import time

    from pregated_jax.engine import engine as engine_module

    events = []

    class RecordingStopwatch(engine_module.Stopwatch):
        def lap(self, *wait):
            events.append(("lap", bool(wait)))
            return super().lap(*wait)

    monkeypatch.setattr(engine_module, "Stopwatch", RecordingStopwatch)
    base = get_preset("tiny", routing="pregated", num_experts=8, expert_capacity=6)
    engine = InferenceEngine(SwitchTransformer(base, rngs=nnx.Rngs(0)), mode="pregated", decode_steps_per_call=3)
    step = engine._decode_step

    def recording_step(*args):
        events.append(("dispatch",))
        return step(*args)

    engine._decode_step = recording_step
    engine._decode = lambda *a, _inner=engine._decode: (events.append(("dispatch",)), _inner(*a))[1]
    run(engine, max_new_tokens=6, fused=fused)  # compiles
    events.clear()
    t0 = time.perf_counter()
    res = run(engine, max_new_tokens=6, fused=fused)
    wall = time.perf_counter() - t0
    first_lap = events.index(("lap", True))  # the prefill's lap waits for its output
    assert events[:first_lap].count(("dispatch",)) == (1 if fused else 0), events
    assert events.count(("dispatch",)) == (2 if fused else 6)
    assert 0 < res.stats.prefill_s and 0 < res.stats.decode_s
    assert res.stats.prefill_s + res.stats.decode_s <= wall
    other = run(engine, max_new_tokens=6, fused=not fused)
    for field in ("steps", "experts_copied", "prefill_experts_copied"):
        assert getattr(res.stats, field) == getattr(other.stats, field), field
    np.testing.assert_array_equal(res.tokens, other.tokens)


@pytest.mark.parametrize("copy_method", ["xla", "dma", "dma-staged"])
def test_guess_started_for_a_step_that_never_ran_counts_as_wasted(copy_method):
    """EOS at the first token, several steps per dispatch: the one step that runs starts the next step's guess
    (its first block's expert), which no block reads. Its copy is counted as moved and wasted, so the bytes
    that had to move equal those of the engine without the guess."""
    base = get_preset("tiny", routing="pregated", num_experts=8, expert_capacity=6)
    first = run(InferenceEngine(SwitchTransformer(base, rngs=nnx.Rngs(0)), mode="pregated"), max_new_tokens=1)
    model = SwitchTransformer(base.replace(eos_token_id=int(first.tokens[0, 0])), rngs=nnx.Rngs(0))
    stats = {}
    method, staged = copy_method.split("-")[0], copy_method.endswith("staged")
    for guess in (True, False):
        engine = InferenceEngine(model, mode="pregated", decode_steps_per_call=4, guess_first_block=guess,
                                 guess_staging=guess and staged, copy_method=method)
        with jax.transfer_guard("disallow"):
            stats[guess] = engine.generate(IDS[:1], MASK[:1], max_new_tokens=9).stats
    on, off = stats[True], stats[False]
    assert on.steps == off.steps == 1
    # step 1 had nothing to repeat (needed 1, found 0); the guess it started for step 2 is the wasted one
    assert (on.speculative_hits, on.speculative_needed, on.speculative_wasted) == (0, 1, 1)
    assert on.experts_copied == off.experts_copied + 1
    assert on.as_dict()["decode_bytes_needed"] == off.as_dict()["decode_bytes_moved"]


@pytest.mark.slow
def test_rows_finishing_at_different_steps_match_the_reference():
    """Batch 3 where row 0 reaches EOS early and the others run on (the tiny model repeats one token per
    row): one and several steps per dispatch give the reference's tokens (padding after row 0's EOS), and
    the steps run are those the reference needed (the last row's EOS, or max_new_tokens)."""
    base = get_preset("tiny", routing="pregated", num_experts=8, expert_capacity=6)
    plain = generate(SwitchTransformer(base, rngs=nnx.Rngs(0)), IDS, MASK, 9)
    eos = int(plain[0, 1])  # a token row 0 emits at its second step: it finishes there or earlier
    model = SwitchTransformer(base.replace(eos_token_id=eos), rngs=nnx.Rngs(0))  # same weights, new EOS
    ref = generate(model, IDS, MASK, 9)
    ends = [list(r).index(eos) + 1 if eos in r else 9 for r in ref.tolist()]
    assert ends[0] < 9
    for per_call in (1, 4):
        res = run(InferenceEngine(model, mode="pregated", decode_steps_per_call=per_call, check_every=1),
                  max_new_tokens=9)
        np.testing.assert_array_equal(res.tokens, ref, err_msg=str(per_call))
        if per_call > 1:
            assert res.stats.steps == max(ends), (ends, res.stats.steps)


@pytest.mark.parametrize("setting, rows, guesses", [({}, 1, False), (dict(guess_first_block=True), 1, True),
                                                     (dict(guess_first_block=True), 3, True),
                                                     (dict(guess_first_block=True, cache_policy="lru", cache_experts=4),
                                                      1, False)])
def test_first_block_guess_is_off_by_default_and_without_a_cache(setting, rows, guesses):
    """The engine guesses only when asked to, at any number of rows, and never with a device cache."""
    cfg = get_preset("tiny", routing="pregated", num_experts=8, expert_capacity=6)
    engine = InferenceEngine(SwitchTransformer(cfg, rngs=nnx.Rngs(0)), mode="pregated", **setting)
    guess = engine._first_guess(rows)
    assert (guess is not None) == guesses
    if guesses:  # the first step has no earlier step to repeat: nothing to copy
        assert np.asarray(guess.slots.expert_ids).tolist() == [-1] * rows


def test_eager_module_loading_is_set_unless_the_environment_chose():
    from pregated_jax.engine.xla_flags import use_eager_module_loading
    env = {}
    assert use_eager_module_loading(env) and env == {"CUDA_MODULE_LOADING": "EAGER"}
    env = {"CUDA_MODULE_LOADING": "LAZY"}
    assert not use_eager_module_loading(env) and env == {"CUDA_MODULE_LOADING": "LAZY"}


def test_command_buffer_loop_flags_are_added_unless_xla_flags_sets_command_buffers():
    from pregated_jax.engine.xla_flags import FLAG, use_command_buffer_loops
    env = {}
    assert use_command_buffer_loops(env) and env["XLA_FLAGS"].startswith(FLAG + "=") and "WHILE" in env["XLA_FLAGS"]
    env = {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
    assert use_command_buffer_loops(env) and env["XLA_FLAGS"].startswith("--xla_dump_to=/tmp/x " + FLAG + "=")
    env = {"XLA_FLAGS": FLAG + "="}  # the user's choice (here: none) stays
    assert not use_command_buffer_loops(env) and env["XLA_FLAGS"] == FLAG + "="


def test_a_lost_native_copy_stops_the_generation_at_the_next_dispatch(monkeypatch):
    """A fault the native copies recorded (a copy that failed, a wait that timed out) is raised before the next
    decode dispatch, so no further step computes with what the lost copy left in its slots."""
    from pregated_jax import native

    cfg = get_preset("tiny", routing="pregated", num_experts=8, expert_capacity=6)
    engine = InferenceEngine(SwitchTransformer(cfg, rngs=nnx.Rngs(0)), mode="pregated", copy_method="dma",
                             decode_steps_per_call=1, stop_when_finished=False)
    dispatches, step = [], engine._decode_step
    engine._decode_step = lambda *args: dispatches.append(args) or step(*args)

    def check_device_wait():  # the fault appears while the second dispatch runs
        if len(dispatches) == 2:
            raise RuntimeError("pgj_fetch_done: the device waited over PREGATED_JAX_DMA_WAIT_TIMEOUT_S")

    monkeypatch.setattr(native, "check_device_wait", check_device_wait)
    with pytest.raises(RuntimeError, match="waited over"):
        engine.generate(IDS[:1], MASK[:1], max_new_tokens=9)
    assert len(dispatches) == 2


@pytest.mark.parametrize("mode", ["pregated", "on-demand"])
@pytest.mark.parametrize("cache", [None, "lru"])
def test_concurrent_calls_equal_sequential_ones_and_leave_the_engine_working(tiny_pregated, mode, cache):
    """Threads calling one engine's `generate` at once get what sequential calls get, and a later call still
    works: a call donates the engine's cache states to its decode steps, so calls run one at a time."""
    engine = InferenceEngine(tiny_pregated, mode=mode, **({} if cache is None else
                                                          {"cache_policy": cache, "cache_experts": 4}))
    inputs = [np.random.default_rng(i).integers(2, 128, IDS.shape) for i in range(4)]
    expected = [engine.generate(x, MASK, max_new_tokens=4).tokens for x in inputs]
    start, results = threading.Barrier(len(inputs)), [None] * len(inputs)

    def call(i):
        start.wait()
        try:
            results[i] = engine.generate(inputs[i], MASK, max_new_tokens=4).tokens
        except Exception as e:  # noqa: BLE001 -- reported below, per thread
            results[i] = e

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (got, want) in enumerate(zip(results, expected)):
        assert not isinstance(got, Exception), f"thread {i}: {got!r}"
        np.testing.assert_array_equal(got, want, err_msg=f"thread {i}")
    np.testing.assert_array_equal(engine.generate(inputs[0], MASK, max_new_tokens=4).tokens, expected[0])


def test_token_ids_outside_the_vocabulary_are_rejected_with_their_position(tiny_pregated):
    """model(...), generate and engine.generate check ids on the host (the embedding lookup would clamp or
    wrap them); inside jit, as in training, ids are tracers and go unchecked."""
    model, v = tiny_pregated, tiny_pregated.config.vocab_size
    engine = InferenceEngine(model, mode="pregated")
    dec = np.zeros((IDS.shape[0], 2), np.int32)
    calls = {"model": lambda ids: model(ids, dec), "generate": lambda ids: generate(model, ids, max_new_tokens=2),
             "engine.generate": lambda ids: engine.generate(ids, max_new_tokens=2)}
    for call in calls.values():
        for value in (v, -1, 2 ** 40):
            ids = IDS.astype(np.int64)
            ids[1, 4] = value
            with pytest.raises(ValueError, match=rf"input_ids has id {value} at row 1, column 4, outside the "
                                                 rf"vocabulary.*\[0, {v}\)"):
                call(ids)
        with pytest.raises(ValueError, match="input_ids must be integer token ids, got dtype float32"):
            call(IDS.astype(np.float32))
    bad = dec.copy()
    bad[2, 1] = v
    with pytest.raises(ValueError, match=rf"decoder_input_ids has id {v} at row 2, column 1"):
        model(IDS, bad)
    jitted = nnx.jit(lambda m, ids, d: m(ids, d))(model, IDS, dec)
    np.testing.assert_allclose(jitted, model(IDS, dec), rtol=1e-5, atol=1e-5)
