"""The engine's routing statistics (`EngineConfig.record_routing`) against a teacher-forced reference.

The reference runs the model once over the inputs and the engine's own generated tokens (teacher forcing) and
counts, per MoE block, the tokens each expert received; co-activation is counted per engine pass (the prefill,
then one decode step per position) from the same decisions, by a plain loop.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from pregated_jax.engine import EngineConfig, InferenceEngine
from pregated_jax.expert_placement import RoutingTrace, moe_block_names, plan_placement

NEW = 6


def _reference(model, ids, tokens):
    """Per MoE block: (tokens per expert [E], co-activation [E, E]) with one step for the encoder pass and one per
    decoder position, from the model's decisions teacher-forced on `tokens` [B, T]."""
    e = model.config.num_experts
    decoder_input_ids = np.concatenate([np.zeros((len(ids), 1), np.int32), tokens[:, :-1]], axis=1)
    _, aux = model(ids, decoder_input_ids, np.ones_like(ids), np.ones_like(decoder_input_ids), return_aux=True)
    decisions = list(aux.encoder_decisions) + list(aux.decoder_decisions)
    out = []
    for n, d in enumerate(decisions):
        index, keep = np.asarray(d.expert_index), np.asarray(d.keep)  # [B, L]
        counts = np.bincount(index[keep], minlength=e)
        steps = [slice(None)] if n < len(aux.encoder_decisions) else [slice(t, t + 1) for t in range(index.shape[1])]
        co = np.zeros((e, e), np.int64)
        for cols in steps:
            fired = np.zeros(e, np.int64)
            fired[np.unique(index[:, cols][keep[:, cols]])] = 1
            co += np.outer(fired, fired)
        out.append((counts, co))
    return out


@pytest.fixture(scope="module")
def recorded(tiny_pregated):
    ids = np.random.default_rng(4).integers(2, tiny_pregated.config.vocab_size, (3, 9)).astype(np.int32)
    engine = InferenceEngine(tiny_pregated, EngineConfig(mode="pregated", record_routing=True,
                                                         stop_when_finished=False, decode_steps_per_call=4))
    res = engine.generate(ids, max_new_tokens=NEW)
    return tiny_pregated, ids, res


def test_counts_and_coactivation_equal_the_teacher_forced_reference(recorded):
    model, ids, res = recorded
    reference = _reference(model, ids, res.tokens)
    assert res.stats.steps == NEW
    assert np.array_equal(np.asarray(res.stats.expert_tokens), np.stack([c for c, _ in reference]))
    trace = res.stats.routing_trace(model.config)
    for name, (counts, co) in zip(moe_block_names(model.config), reference):
        np.testing.assert_array_equal(trace.counts[name], counts)
        np.testing.assert_array_equal(trace.coactivation[name], co)
    assert trace.steps == 1 + NEW
    assert res.stats.device_tokens is None  # one device


def test_an_engine_trace_plans_a_placement(recorded, tmp_path):
    model, _, res = recorded
    trace = res.stats.routing_trace(model.config, checkpoint="tiny")
    path = tmp_path / "trace.json"
    trace.save(path)
    loaded = RoutingTrace.load(path)
    placement = plan_placement(loaded, 4)
    assert set(placement) == set(moe_block_names(model.config))
    assert all(sorted(p.tolist()) == list(range(8)) for p in placement.values())


@pytest.mark.slow
def test_infer_saves_a_trace_that_plan_placement_reads(tmp_path):
    import importlib.util
    from pathlib import Path

    from pregated_jax.cli import infer

    trace_path, out = tmp_path / "trace.json", tmp_path / "placement.json"
    infer.main(["--text", "A tool to resize images from the command line.", "--max_new_tokens", "4",
                "--save_trace", str(trace_path)])
    trace = RoutingTrace.load(trace_path)
    assert trace.meta["source"] == "infer" and trace.steps >= 2
    assert all(c.sum() > 0 for c in trace.counts.values())
    script = Path(__file__).resolve().parents[1] / "scripts" / "plan_placement.py"
    spec = importlib.util.spec_from_file_location("plan_placement", script)
    plan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plan)
    assert plan.main(["--trace", str(trace_path), "--devices", "4", "--out", str(out)]) == 0
    blocks = json.loads(out.read_text())["blocks"]
    assert set(blocks) == set(trace.counts) and all(sorted(p) == list(range(8)) for p in blocks.values())


def test_without_record_routing_nothing_is_recorded(tiny_pregated):
    ids = np.full((1, 4), 5, np.int32)
    res = InferenceEngine(tiny_pregated, EngineConfig(mode="pregated")).generate(ids, max_new_tokens=2)
    assert res.stats.expert_tokens is None
    with pytest.raises(ValueError, match="record_routing=True"):
        res.stats.routing_trace(tiny_pregated.config)


def test_scripts_take_record_routing():
    from pregated_jax.cli import infer

    assert infer.parse_args(["--record_routing", "on"]).record_routing is True
    assert infer.parse_args([]).record_routing is False
