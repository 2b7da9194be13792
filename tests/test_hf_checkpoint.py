"""`from_pretrained` / `save_pretrained`: round trips, HF-written formats, and error messages.

The live tests build fresh random HF models with torch and are skipped when torch or transformers is
missing; the rest use the stored fixtures (tests/fixtures/hf) and our own models.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from pregated_jax.config import get_preset
from pregated_jax.hf_checkpoint import CheckpointError, from_pretrained, hf_state_dict, save_pretrained
from pregated_jax.model import SwitchTransformer

FIXTURE = Path(__file__).parent / "fixtures" / "hf" / "base_like"


def params_of(model) -> dict[tuple, np.ndarray]:
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_params(a, b):
    pa, pb = params_of(a), params_of(b)
    assert set(pa) == set(pb)
    for path in pa:
        assert pa[path].dtype == pb[path].dtype == np.float32, path
        np.testing.assert_array_equal(pa[path], pb[path], err_msg=str(path))


def assert_same_config(loaded, original):
    # A dropless config (expert_capacity None) is written as HF's int32 max, which routes identically.
    if original.expert_capacity is None:
        assert loaded.expert_capacity is None
        loaded = loaded.replace(expert_capacity=None)
    assert loaded == original


# --- our models: save -> load is lossless ------------------------------------------------------------

@pytest.mark.parametrize("overrides", [dict(routing="pregated"), dict(tie_word_embeddings=False)],
                         ids=["pregated", "untied"])
def test_round_trip_is_lossless(tmp_path, overrides):
    config = get_preset("tiny", **overrides)
    model = SwitchTransformer(config, rngs=nnx.Rngs(0))
    save_pretrained(model, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = from_pretrained(tmp_path / "ckpt")
    assert_same_config(loaded.config, config)
    assert_same_params(loaded, model)
    if config.routing == "pregated":
        saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
        assert saved["pregated_jax"]["routing"] == "pregated"
        names = hf_state_dict(model)
        assert "encoder.block.1.layer.1.mlp.pregate.classifier.weight" in names
        assert "encoder.block.3.layer.1.mlp.router.classifier.weight" not in names  # pre-gated by block 1


def test_save_in_bfloat16_stores_bf16_and_loads_the_rounded_weights(tmp_path):
    import ml_dtypes
    from safetensors.numpy import load_file

    model = SwitchTransformer(get_preset("tiny", routing="pregated"), rngs=nnx.Rngs(0))
    save_pretrained(model, tmp_path / "bf16", dtype="bfloat16")
    stored = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert {v.dtype for v in stored.values()} == {np.dtype(ml_dtypes.bfloat16)}
    loaded = params_of(from_pretrained(tmp_path / "bf16"))
    for path, value in params_of(model).items():  # float32 in memory, each weight rounded to bf16 once
        np.testing.assert_array_equal(loaded[path], value.astype(ml_dtypes.bfloat16).astype(np.float32), str(path))
    with pytest.raises(ValueError, match="float16"):
        save_pretrained(model, tmp_path / "f16", dtype="float16")


def test_save_over_existing_checkpoint_replaces_weights(tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, target)
    (target / "pytorch_model.bin").write_bytes(b"stale")
    model = SwitchTransformer(get_preset("tiny"), rngs=nnx.Rngs(1))
    save_pretrained(model, target)
    assert not (target / "pytorch_model.bin").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directory left behind"
    assert_same_params(from_pretrained(target), model)


def test_load_options(tmp_path):
    bf16 = from_pretrained(FIXTURE, dtype="bfloat16")
    assert bf16.config.dtype == "bfloat16"
    assert all(v.dtype == np.float32 for v in params_of(bf16).values())
    # A conventional checkpoint loaded as pre-gated: each pre-gate starts as the next MoE block's gate.
    pregated, conventional = from_pretrained(FIXTURE, routing="pregated"), from_pretrained(FIXTURE)
    assert pregated.config.routing == "pregated"
    for stack in ("encoder", "decoder"):
        first, second = conventional.config.sparse_blocks(stack)[:2]
        np.testing.assert_array_equal(getattr(pregated, stack).blocks[first].pregate.classifier[...],
                                      getattr(conventional, stack).blocks[second].router.classifier[...])
    save_pretrained(pregated, tmp_path / "pregated")
    with pytest.raises(CheckpointError, match="pregated checkpoint cannot be loaded with routing='conventional'"):
        from_pretrained(tmp_path / "pregated", routing="conventional")


# --- error messages name the problem -------------------------------------------------------------------

@pytest.fixture
def ckpt(tmp_path):
    """A writable copy of the base_like fixture; returns (dir, tensors dict, save function)."""
    from safetensors.numpy import load_file, save_file

    target = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, target)
    tensors = load_file(target / "model.safetensors")

    def save():
        save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})

    return target, tensors, save


def edit_config(directory: Path, **changes):
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def test_missing_tensor(ckpt):
    directory, tensors, save = ckpt
    del tensors["encoder.block.1.layer.1.mlp.experts.expert_2.wo.weight"]
    save()
    with pytest.raises(CheckpointError, match=r"missing tensor.*'encoder\.block\.1\.layer\.1\.mlp\.experts\."
                                              r"expert_2\.wo\.weight'") as err:
        from_pretrained(directory)
    assert str(directory / "model.safetensors") in str(err.value)


def test_unexpected_tensor(ckpt):
    directory, tensors, save = ckpt
    tensors["encoder.block.0.layer.1.mlp.router.classifier.weight"] = np.zeros((4, 24), np.float32)  # dense block
    save()
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*'encoder\.block\.0\.layer\.1\.mlp\.router"):
        from_pretrained(directory)


def test_wrong_shape(ckpt):
    directory, tensors, save = ckpt
    name = "encoder.block.0.layer.1.mlp.wi.weight"
    assert tensors[name].shape == (32, 24)
    tensors[name] = np.ascontiguousarray(tensors[name].T)
    save()
    with pytest.raises(CheckpointError, match=rf"'{name}' has shape \(24, 32\), expected \(32, 24\)"):
        from_pretrained(directory)


def test_tied_duplicate_that_differs(ckpt):
    directory, tensors, save = ckpt
    tensors["lm_head.weight"] = tensors["shared.weight"] + 1.0
    save()
    with pytest.raises(CheckpointError, match="'lm_head.weight' differs from 'shared.weight'"):
        from_pretrained(directory)


@pytest.mark.parametrize("field,value", [("dense_act_fn", "gelu"), ("num_heads", 0), ("router_bias", True)])
def test_unsupported_config(ckpt, field, value):
    directory, _, _ = ckpt
    edit_config(directory, **{field: value})
    with pytest.raises(CheckpointError, match=field) as err:
        from_pretrained(directory)
    assert "config.json" in str(err.value)


def test_missing_config(ckpt):
    directory, _, _ = ckpt
    (directory / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json") as err:
        from_pretrained(directory)
    assert str(directory) in str(err.value)


def test_no_weights_file(ckpt):
    directory, _, _ = ckpt
    (directory / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights file.*model.safetensors.*pytorch_model.bin") as err:
        from_pretrained(directory)
    assert str(directory) in str(err.value)


def test_missing_shard(ckpt):
    directory, tensors, _ = ckpt
    (directory / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {name: "model-00001-of-00002.safetensors" for name in tensors}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="shard model-00001-of-00002.safetensors is missing"):
        from_pretrained(directory)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        from_pretrained(tmp_path / "nothing")


# --- live: fresh HF models (torch + transformers) --------------------------------------------------------

LIVE_CONFIG = dict(vocab_size=50, d_model=20, d_kv=5, d_ff=28, num_heads=4, num_layers=2, num_decoder_layers=3,
                   num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, num_experts=3, expert_capacity=3,
                   relative_attention_num_buckets=12, relative_attention_max_distance=16,
                   decoder_start_token_id=0)


def make_hf_model(seed: int, **overrides):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.SwitchTransformersConfig(**{**LIVE_CONFIG, **overrides})
    model = transformers.SwitchTransformersForConditionalGeneration(config)
    if not config.tie_word_embeddings:  # transformers 5 unties these too; real checkpoints share them
        with torch.no_grad():
            model.encoder.embed_tokens.weight.copy_(model.shared.weight)
            model.decoder.embed_tokens.weight.copy_(model.shared.weight)
    return model.eval()


def hf_logits(model, inputs):
    import torch

    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits.numpy()


def live_inputs(seed):
    rng = np.random.default_rng(seed)
    mask = np.ones((2, 9), np.int64)
    mask[1, 6:] = 0
    return dict(input_ids=rng.integers(2, 50, (2, 9)) * mask, attention_mask=mask,
                decoder_input_ids=np.concatenate([np.zeros((2, 1), np.int64), rng.integers(2, 50, (2, 5))], 1),
                decoder_attention_mask=np.ones((2, 6), np.int64))


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_live_hf_round_trip(tmp_path, tie):
    """HF -> ours matches HF's logits; ours -> HF loads cleanly and gives HF's logits again."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    hf = make_hf_model(1234 + tie, tie_word_embeddings=tie)
    inputs = live_inputs(7)
    want = hf_logits(hf, inputs)
    hf.save_pretrained(tmp_path / "hf")
    ours = from_pretrained(tmp_path / "hf")
    if tie:  # the untied forward is covered by the `buckets` fixture; skip a second compile here
        got = np.asarray(nnx.jit(lambda m, *a: m(*a))(
            ours, inputs["input_ids"], inputs["decoder_input_ids"], inputs["attention_mask"],
            inputs["decoder_attention_mask"]))
        assert np.abs(got - want).max() <= 1e-4
    save_pretrained(ours, tmp_path / "ours")
    back, info = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(
        tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert back.config.tie_word_embeddings == tie
    original, reloaded = hf.state_dict(), back.state_dict()
    assert set(original) == set(reloaded)
    for name in original:
        assert original[name].equal(reloaded[name]), name
    # Same weights; torch's CPU kernels may still differ in the last bit with another memory layout.
    np.testing.assert_allclose(hf_logits(back.eval(), inputs), want, rtol=0, atol=1e-5)


def test_live_bin_sharded_and_bf16(tmp_path):
    """pytorch_model.bin (all tied keys, as transformers 4 wrote it), sharded .bin and safetensors,
    and bfloat16 tensors all load to the same params as the plain safetensors file."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from safetensors.torch import save_file

    hf = make_hf_model(99)
    hf.save_pretrained(tmp_path / "safetensors")
    reference = from_pretrained(tmp_path / "safetensors")
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    config = tmp_path / "safetensors" / "config.json"

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(config, bin_dir)
    torch.save(state, bin_dir / "pytorch_model.bin")
    assert "lm_head.weight" in state and "encoder.embed_tokens.weight" in state
    assert_same_params(from_pretrained(bin_dir), reference)

    sharded_bin = tmp_path / "sharded_bin"
    sharded_bin.mkdir()
    shutil.copy(config, sharded_bin)
    names = sorted(state)
    weight_map = {}
    for k, part in enumerate((names[::2], names[1::2])):
        file = f"pytorch_model-0000{k + 1}-of-00002.bin"
        torch.save({n: state[n] for n in part}, sharded_bin / file)
        weight_map.update({n: file for n in part})
    (sharded_bin / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_same_params(from_pretrained(sharded_bin), reference)

    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    assert_same_params(from_pretrained(tmp_path / "sharded"), reference)

    bf16_dir = tmp_path / "bf16"
    bf16_dir.mkdir()
    shutil.copy(config, bf16_dir)
    bf16 = {k: v.to(torch.bfloat16) for k, v in state.items() if "embed_tokens" not in k and k != "lm_head.weight"}
    save_file(bf16, str(bf16_dir / "model.safetensors"), metadata={"format": "pt"})
    rounded = {k: v.float() for k, v in bf16.items()}
    hf_rounded = make_hf_model(99)
    hf_rounded.load_state_dict(rounded, strict=False)
    hf_rounded.save_pretrained(tmp_path / "rounded")
    assert_same_params(from_pretrained(bf16_dir), from_pretrained(tmp_path / "rounded"))


@pytest.mark.parametrize("text, message", [
    ('{"d_model": 32.0}', r"SwitchConfig\.d_model must be an integer, got 32\.0 \(a float\)"),
    ('{"tie_word_embeddings": "false"}', r"SwitchConfig\.tie_word_embeddings must be a boolean \(true/false\), "
                                         r"got 'false' \(a string\)"),
    ('{"layer_norm_epsilon": "abc"}', r"SwitchConfig\.layer_norm_epsilon must be a number, got 'abc' \(a string\)"),
    ("[1, 2]", r"expected a JSON object of config fields, got an array")])
def test_config_json_field_types(ckpt, text, message):
    """A config.json whose values have the wrong JSON type (or that is not an object) is refused at load,
    naming the file, the field, the value and the type allowed."""
    directory, _, _ = ckpt
    config = json.loads((directory / "config.json").read_text())
    edit = json.loads(text)
    (directory / "config.json").write_text(json.dumps(config | edit if isinstance(edit, dict) else edit))
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(directory / 'config.json'))}: {message}$"):
        from_pretrained(directory)


def test_safetensors_header_length_past_the_file(ckpt):
    """A header length field of 2**62 is refused naming the file, before anything is allocated for it."""
    directory, _, _ = ckpt
    file = directory / "model.safetensors"
    raw = file.read_bytes()
    file.write_bytes((2**62).to_bytes(8, "little") + raw[8:])
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(file))}: not a safetensors file: its header length "
                                              rf"field says {2**62} bytes, but the file has {len(raw) - 8} bytes"):
        from_pretrained(directory)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_save_pretrained_follows_the_umask(tmp_path, umask):
    """The folder and files get the modes a plain mkdir / open gives under the umask (not 0700 / 0600), both
    for a new folder and for files replaced in an existing one."""
    import os
    import stat

    model = SwitchTransformer(get_preset("tiny"), rngs=nnx.Rngs(0))
    old = os.umask(umask)
    try:
        out = save_pretrained(model, tmp_path / "new")
        existing = tmp_path / "existing"
        existing.mkdir()
        save_pretrained(model, existing)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    for folder in (out, existing):
        assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in folder.iterdir()} == {
            "config.json": 0o666 & ~umask, "model.safetensors": 0o666 & ~umask}
