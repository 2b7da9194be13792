"""Presets (parameter counts of the public checkpoints, by eval_shape), sparse layout, HF config mapping."""

import math
import re

import numpy as np
import pytest

from pregated_jax.config import PRESETS, SwitchConfig, get_preset
from pregated_jax.model import param_shapes

# Parameter counts of the public Hugging Face checkpoints (num_parameters(), tied embeddings once).
PUBLIC_COUNTS = {"switch-base-8": 619_339_008}


def count(cfg):
    return sum(math.prod(s) for s in param_shapes(cfg).values())


def test_switch_base_8_matches_public_checkpoint():
    assert count(get_preset("switch-base-8")) == PUBLIC_COUNTS["switch-base-8"]


@pytest.mark.parametrize("name", ["switch-base-128", "switch-large-128"])
def test_large_presets_match_published_sizes(name):
    # NOTES §2: base-128 ≈ 7.415 B, large-128 ≈ 26.31 B.
    expected = {"switch-base-128": 7.415e9, "switch-large-128": 26.31e9}[name]
    assert abs(count(get_preset(name)) - expected) / expected < 5e-4


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_matches_hf_parameter_count(name):
    """Exact, against HF's own model built on torch's meta device (no memory allocated)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = get_preset(name)
    hf_kwargs = {k: v for k, v in cfg.to_hf_dict().items() if k != "pregated_jax"}
    with torch.device("meta"):
        hf = transformers.SwitchTransformersForConditionalGeneration(
            transformers.SwitchTransformersConfig(**hf_kwargs))
    assert count(cfg) == hf.num_parameters()


def test_pregated_adds_one_classifier_per_moe_block_boundary():
    cfg = get_preset("switch-base-8")
    pre = cfg.replace(routing="pregated")
    # Each stack: 6 MoE blocks -> gates: conventional 6; pregated 1 own + 5 pre-gates = 6.
    assert count(pre) == count(cfg)
    assert sum("pregate" in p for p in param_shapes(pre)) == 10


def test_sparse_layout_follows_hf_rule():
    cfg = get_preset("switch-base-8")
    assert cfg.sparse_blocks("encoder") == (1, 3, 5, 7, 9, 11)
    every = cfg.replace(num_layers=3, num_sparse_encoder_layers=3)
    assert every.sparse_blocks("encoder") == (0, 1, 2)
    third = cfg.replace(num_decoder_layers=9, num_sparse_decoder_layers=3)
    assert third.sparse_blocks("decoder") == (1, 4, 7)
    # HF's quirk, kept for checkpoint compatibility: zero sparse layers gives step = num_layers, so
    # block 1 is still sparse.
    assert cfg.replace(num_sparse_encoder_layers=0, num_layers=4).sparse_blocks("encoder") == (1,)


def test_capacity_rules():
    cfg = get_preset("tiny", expert_capacity=5)
    assert cfg.capacity(100) == 5
    assert cfg.replace(capacity_factor=1.25).capacity(10) == 4  # ceil(1.25 * 10 / 4)
    assert cfg.replace(expert_capacity=None).capacity(10) is None


def test_hf_dict_round_trip_and_errors():
    cfg = get_preset("tiny", routing="pregated", capacity_factor=2.0)
    assert SwitchConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    assert SwitchConfig.from_hf_dict(cfg.replace(expert_capacity=None).to_hf_dict()).expert_capacity is None
    bad = cfg.to_hf_dict() | {"dense_act_fn": "gelu"}
    with pytest.raises(ValueError, match="dense_act_fn"):
        SwitchConfig.from_hf_dict(bad, "x/config.json")
    with pytest.raises(ValueError, match="x/config.json: .*num_heads"):
        SwitchConfig.from_hf_dict(cfg.to_hf_dict() | {"num_heads": 0}, "x/config.json")
    with pytest.raises(ValueError, match="routing"):
        SwitchConfig(routing="sideways")
    with pytest.raises(KeyError, match="unknown preset"):
        get_preset("switch-huge")


@pytest.mark.parametrize("field, value, allowed", [
    ("d_model", 32.0, "an integer"), ("num_experts", True, "an integer"),
    ("tie_word_embeddings", "false", r"a boolean \(true/false\)"), ("layer_norm_epsilon", "abc", "a number"),
    ("expert_capacity", 2.5, "an integer or null/None"), ("num_heads", "4", "an integer")])
def test_field_types_are_checked_naming_field_value_and_type(field, value, allowed):
    """A config.json value of the wrong JSON type is refused when the config is built (a string "false"
    would read as true; "abc" as an epsilon would fail only at the first forward)."""
    with pytest.raises(ValueError, match=rf"^x/config.json: SwitchConfig\.{field} must be {allowed}, "
                                         rf"got {re.escape(repr(value))} \("):
        SwitchConfig.from_hf_dict(get_preset("tiny").to_hf_dict() | {field: value}, "x/config.json")
    ok = SwitchConfig(layer_norm_epsilon=1, capacity_factor=2, d_model=np.int64(64))  # ints for floats, numpy ints
    assert (ok.layer_norm_epsilon, ok.capacity_factor, ok.d_model) == (1, 2, 64)


def test_hf_dict_must_be_an_object():
    with pytest.raises(ValueError, match=r"^x/config.json: expected a JSON object of config fields, got an array$"):
        SwitchConfig.from_hf_dict([{"d_model": 32}], "x/config.json")
