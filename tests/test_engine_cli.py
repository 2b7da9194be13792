"""The engine's command-line form: a flag for every EngineConfig field, flags -> EngineConfig -> JSON and back."""

import argparse
import dataclasses
import json

import pytest

from pregated_jax.engine import EngineConfig
from pregated_jax.engine_cli import (FLAGS, GIB, add_engine_flags, engine_config_from_args, flag_name, flag_text,
                                     from_json, to_json)

# a value other than the default for every field, as a command line gives it
NON_DEFAULT = dict(mode="on-demand", cache_policy="lfu", cache_experts=5, device_budget_bytes=3 * GIB // 2,
                   prefill_chunk=4, check_every=3, decode_steps_per_call=16, stop_when_finished=False,
                   guess_first_block=True, guess_staging=True, prefill_routed_only=False, copy_method="dma",
                   expert_dtype="int4", expert_group_size=64, record_routing=True)


def _parser(**kw) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_engine_flags(p, **kw)
    return p


def test_every_field_has_a_flag_with_help():
    """A new EngineConfig field fails here until engine_cli.FLAGS describes it (and NON_DEFAULT covers it)."""
    fields = [f.name for f in dataclasses.fields(EngineConfig)]
    assert sorted(FLAGS) == sorted(fields)
    assert sorted(NON_DEFAULT) == sorted(fields)
    help_text = _parser().format_help()
    for name in fields:
        assert FLAGS[name].help and f"--{flag_name(name)}" in help_text, name


def test_defaults_are_engine_config_defaults():
    assert engine_config_from_args(_parser().parse_args([])) == EngineConfig()


def test_flags_to_config_to_json_and_back():
    argv = [w for name, value in NON_DEFAULT.items() for w in (f"--{flag_name(name)}", flag_text(name, value))]
    assert "--device_budget_gib" in argv and "1.5" in argv and "--guess_first_block" in argv and "on" in argv
    args = _parser().parse_args(argv)
    config = engine_config_from_args(args)
    assert dataclasses.asdict(config) == NON_DEFAULT
    text = to_json(config)
    assert json.loads(text) == NON_DEFAULT and from_json(text) == config


def test_words_and_units():
    p = _parser()
    for word, value in (("on", True), ("off", False)):
        assert p.parse_args(["--guess_first_block", word]).guess_first_block is value
    assert p.parse_args(["--device_budget_gib", "0.25"]).device_budget_bytes == GIB // 4
    assert p.parse_args(["--copy_method", "auto"]).copy_method == "auto"
    assert flag_text("guess_first_block", True) == "on" and flag_text("device_budget_bytes", GIB) == "1"
    with pytest.raises(SystemExit):
        p.parse_args(["--guess_first_block", "maybe"])
    with pytest.raises(SystemExit):
        p.parse_args(["--copy_method", "memcpy"])


def test_exclude_defaults_overrides_and_the_mode_a_model_needs():
    p = _parser(exclude=("mode",), stop_when_finished=False)
    assert "--mode" not in p.format_help()
    args = p.parse_args([])
    assert not hasattr(args, "mode") and args.stop_when_finished is False
    assert engine_config_from_args(args, mode="gpu-only") == EngineConfig(mode="gpu-only", stop_when_finished=False)

    p = _parser(mode=None)
    assert "pregated for pre-gated models" in p.format_help()
    assert engine_config_from_args(p.parse_args([]), routing="conventional").mode == "speculative"
    assert engine_config_from_args(p.parse_args([]), routing="pregated").mode == "pregated"
    assert engine_config_from_args(p.parse_args(["--mode", "on-demand"]), routing="pregated").mode == "on-demand"
    with pytest.raises(ValueError, match="no engine mode"):
        engine_config_from_args(p.parse_args([]))
    with pytest.raises(ValueError, match="not EngineConfig fields"):
        _parser(exclude=("cache",))


def test_from_json_names_unknown_fields():
    with pytest.raises(ValueError, match="'cache'"):
        from_json(json.dumps({"mode": "pregated", "cache": "lru"}))
