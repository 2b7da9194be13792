"""T5X checkpoint import: small T5X-format checkpoints (tests/t5x_writer.py: msgpack + tensorstore zarr arrays,
several chunks per array) written from the HF fixtures' weights must load to the same model as the HF load of
those weights, and to the logits transformers computed for them (expected.npz). Bad checkpoints fail naming
the file, the parameter and the shape."""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import shutil
from pathlib import Path

import ml_dtypes
import msgpack
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file
from t5x_writer import hf_to_flaxformer, write_t5x, write_t5x_orbax

import pregated_jax as pj
from pregated_jax.hf_checkpoint import CheckpointError, from_pretrained
from pregated_jax.t5x_checkpoint import is_t5x_checkpoint, load_t5x

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "hf"
SAME_WEIGHTS_ATOL = 1e-5  # against the HF load of the same weights
TORCH_ATOL = 1e-4  # against transformers' logits (as tests/test_hf_parity.py)
SHAPE_FIELDS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers", "num_decoder_layers",
                "num_sparse_encoder_layers", "num_sparse_decoder_layers", "num_experts",
                "relative_attention_num_buckets", "tie_word_embeddings")


@functools.cache
def hf_weights(name: str) -> tuple[dict, dict[str, np.ndarray]]:
    return json.loads((FIXTURES / name / "config.json").read_text()), load_file(FIXTURES / name / "model.safetensors")


@functools.cache
def hf_model(name: str):
    return from_pretrained(FIXTURES / name)


@functools.cache
def expected(name: str) -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURES / name / "expected.npz"))


def flaxformer_params(name: str, dtype=np.float32) -> dict[str, np.ndarray]:
    config, tensors = hf_weights(name)
    return hf_to_flaxformer({k: v.astype(dtype) for k, v in tensors.items()}, config)


def params_of(model) -> dict[tuple, np.ndarray]:
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@nnx.jit
def _forward(model, input_ids, decoder_input_ids, attention_mask, decoder_attention_mask):
    return model(input_ids, decoder_input_ids, attention_mask, decoder_attention_mask)


def logits(model, name: str) -> np.ndarray:
    e = expected(name)
    return np.asarray(_forward(model, e["input_ids"], e["decoder_input_ids"], e["attention_mask"],
                               e["decoder_attention_mask"]))


def assert_same_model(model, reference, name: str):
    assert model.config == reference.config
    ours, theirs = params_of(model), params_of(reference)
    assert set(ours) == set(theirs)
    for path in theirs:
        assert ours[path].dtype == np.float32, path
        np.testing.assert_array_equal(ours[path], theirs[path], err_msg=str(path))
    diff = np.abs(logits(model, name) - logits(reference, name)).max()
    assert diff <= SAME_WEIGHTS_ATOL, f"{name}: max |logit diff| against the HF load {diff:.3g}"


@functools.cache
def convert_script():
    spec = importlib.util.spec_from_file_location("convert_t5x_script", ROOT / "scripts" / "convert_t5x.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- module-scoped checkpoints ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_f32(tmp_path_factory):
    """base_like as a T5X model folder: checkpoint_1000/ (float32 zarr arrays, the encoder's final norm
    inlined in the msgpack file), beside an older checkpoint_500/ and an unfinished later save, both without
    parameters, so loading either would fail."""
    root = tmp_path_factory.mktemp("t5x") / "base_like"
    write_t5x(root / "checkpoint_1000", flaxformer_params("base_like"), inline=("encoder/encoder_norm/scale",))
    (root / "checkpoint_500").mkdir()
    (root / "checkpoint_500" / "checkpoint").write_bytes(msgpack.packb({"version": 3, "optimizer": {}}))
    write_t5x(root / "checkpoint_2000.tmp-1700000000", {}, optimizer_state=False)
    return root


@pytest.fixture(scope="module")
def base_f32_model(base_f32):
    return load_t5x(base_f32)


# --- loading ------------------------------------------------------------------------------------------

def test_float32_checkpoint_loads_like_hf(base_f32, base_f32_model):
    assert is_t5x_checkpoint(base_f32) and is_t5x_checkpoint(base_f32 / "checkpoint_1000")
    assert not is_t5x_checkpoint(FIXTURES / "base_like")
    # Config inferred from the shapes alone equals the fixture's config.json.
    assert_same_model(base_f32_model, hf_model("base_like"), "base_like")
    diff = np.abs(logits(base_f32_model, "base_like") - expected("base_like")["logits"]).max()
    assert diff <= TORCH_ATOL, f"max |logit diff| against transformers {diff:.3g}"


def test_bfloat16_checkpoint_loads_like_hf_of_the_same_weights(tmp_path):
    """bf16 zarr arrays (their specs as t5x records them for a checkpoint saved on GCS, like the public
    releases) against an HF directory holding the same bf16-rounded weights."""
    step = write_t5x(tmp_path / "checkpoint_7", flaxformer_params("base_like", ml_dtypes.bfloat16), dtype="bfloat16",
                     gcs_specs=True)
    spec = msgpack.unpackb((step / "checkpoint").read_bytes())["optimizer"]["target"]["token_embedder"]["embedding"]
    assert spec["kvstore"] == {"driver": "gcs", "bucket": "t5x-dummy-bucket"}
    zarray = json.loads((step / "target.encoder.layers_1.mlp.expert.wi.kernel" / ".zarray").read_text())
    assert zarray["dtype"] == "bfloat16" and len(zarray["chunks"]) == 3 and zarray["chunks"] != zarray["shape"]
    reference = tmp_path / "hf_bf16"
    reference.mkdir()
    shutil.copy(FIXTURES / "base_like" / "config.json", reference)
    rounded = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in hf_weights("base_like")[1].items()}
    save_file(rounded, str(reference / "model.safetensors"))
    assert_same_model(load_t5x(step), from_pretrained(reference), "base_like")


@pytest.mark.parametrize("name", ["buckets", "asym"])
def test_config_from_hf_config_json(tmp_path, name):
    """buckets: untied LM head (decoder/logits_dense), 16 buckets; asym: 3 all-sparse encoder layers, 6
    decoder layers with MoE at 1 and 4. Both use a relative_attention_max_distance other than 128."""
    step = write_t5x(tmp_path / "checkpoint_1", flaxformer_params(name))
    model = load_t5x(step, config=FIXTURES / name / "config.json")
    assert_same_model(model, hf_model(name), name)
    assert np.abs(logits(model, name) - expected(name)["logits"]).max() <= TORCH_ATOL
    # Inference gets every shape field right; the distance no array records takes the public checkpoints' 128.
    inferred, want = load_t5x(step).config, hf_model(name).config
    for field in SHAPE_FIELDS:
        assert getattr(inferred, field) == getattr(want, field), field
    assert inferred.relative_attention_max_distance == 128 != want.relative_attention_max_distance


def test_entry_points_detect_t5x(base_f32, base_f32_model):
    want = logits(base_f32_model, "base_like")
    for model in (pj.load_model(base_f32), pj.from_pretrained(base_f32 / "checkpoint_1000")):
        np.testing.assert_array_equal(logits(model, "base_like"), want)
    assert pj.load_model(base_f32, dtype="bfloat16").config.dtype == "bfloat16"
    pregated = pj.from_pretrained(base_f32, routing="pregated")
    assert pregated.config.routing == "pregated"
    np.testing.assert_array_equal(pregated.encoder.blocks[1].pregate.classifier.get_value(),
                                  base_f32_model.encoder.blocks[3].router.classifier.get_value())
    given = load_t5x(base_f32, config=hf_model("base_like").config.replace(expert_capacity=2))
    assert given.config.expert_capacity == 2


def test_config_json_beside_the_checkpoint_is_used(tmp_path):
    """What the shapes cannot give (here relative_attention_max_distance 20) comes from a config.json placed in
    the model folder, so `--checkpoint DIR` needs no extra flag."""
    write_t5x(tmp_path / "checkpoint_3", flaxformer_params("buckets"))
    shutil.copy(FIXTURES / "buckets" / "config.json", tmp_path)
    assert pj.load_model(tmp_path).config == hf_model("buckets").config


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_orbax_format_checkpoint_loads_like_hf(tmp_path, base_f32_model, dtype):
    """Newer t5x: checkpoint_<step>/state, an Orbax PyTree (OCDBT) with the same names."""
    params = flaxformer_params("base_like")
    write_t5x_orbax(tmp_path, 500, {k: np.zeros_like(v) for k, v in params.items()})  # an older step
    step = write_t5x_orbax(tmp_path, 900, params, dtype)
    assert not (step / "checkpoint").exists() and is_t5x_checkpoint(tmp_path)
    model = pj.load_model(tmp_path)
    want = base_f32_model if dtype == "float32" else load_t5x(
        write_t5x(tmp_path / "msgpack_bf16", flaxformer_params("base_like", ml_dtypes.bfloat16), dtype="bfloat16"))
    assert_same_model(model, want, "base_like")
    if dtype == "float32":
        shutil.rmtree(step / "state" / "ocdbt.process_0")  # the arrays' data
        with pytest.raises(CheckpointError, match=re.escape(f"{step / 'state'} (array 'target.")):
            load_t5x(step)


def test_our_training_checkpoints_are_not_t5x(tmp_path):
    from pregated_jax.train.checkpoints import CheckpointStore

    model = pj.SwitchTransformer(pj.get_preset("tiny"), rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    store = CheckpointStore(tmp_path / "checkpoints", keep=1, async_save=False)
    store.save(3, {"step": 3, "params": params, "opt_state": {}, "rngs": {}}, {"model_config": {}})
    store.close()
    assert not is_t5x_checkpoint(tmp_path / "checkpoints" / "3")
    assert not is_t5x_checkpoint(tmp_path / "checkpoints") and not is_t5x_checkpoint(tmp_path)


@pytest.mark.parametrize("fmt", ["ours", "hf"])
def test_convert_script(tmp_path, base_f32, base_f32_model, fmt):
    out = convert_script().main(["--t5x", str(base_f32), "--out", str(tmp_path / "out"), "--format", fmt])
    assert Path(out).name == ("1000" if fmt == "ours" else "out")
    loaded = pj.load_model(tmp_path / "out")
    assert loaded.config == base_f32_model.config
    for path, value in params_of(base_f32_model).items():
        np.testing.assert_array_equal(params_of(loaded)[path], value, err_msg=str(path))


def test_convert_script_errors(tmp_path, base_f32):
    with pytest.raises(SystemExit, match=f"error: {re.escape(str(tmp_path))}: not a T5X checkpoint"):
        convert_script().main(["--t5x", str(tmp_path), "--out", str(tmp_path / "out")])
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="exists and is not a folder"):
        convert_script().main(["--t5x", str(base_f32), "--out", str(tmp_path / "file")])


def test_converted_hf_directory_loads_in_transformers(tmp_path, base_f32):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    convert_script().main(["--t5x", str(base_f32), "--out", str(tmp_path / "hf"), "--format", "hf"])
    hf = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    e = expected("base_like")
    with torch.no_grad():
        got = hf(input_ids=torch.tensor(e["input_ids"]), attention_mask=torch.tensor(e["attention_mask"]),
                 decoder_input_ids=torch.tensor(e["decoder_input_ids"]),
                 decoder_attention_mask=torch.tensor(e["decoder_attention_mask"])).logits.numpy()
    assert np.abs(got - e["logits"]).max() <= SAME_WEIGHTS_ATOL  # the fixture's own transformers logits


# --- errors -------------------------------------------------------------------------------------------

def _edit(params: dict, drop=(), drop_prefix=None, add=None, reshape=None) -> dict:
    out = {k: v for k, v in params.items() if k not in drop and not (drop_prefix and k.startswith(drop_prefix))}
    out.update(add or {})
    for name, shape in (reshape or {}).items():
        out[name] = np.zeros(shape, np.float32)
    return out


EXPERT_WO = "decoder/layers_1/mlp/expert/wo/kernel"
BAD = {
    "missing": (dict(drop=[EXPERT_WO]), [f"missing parameter(s) '{EXPERT_WO}'"]),
    "extra": (dict(add={"encoder/layers_0/mlp/extra/kernel": np.zeros((2, 2))}),
              ["unexpected parameter(s) 'encoder/layers_0/mlp/extra/kernel'"]),
    "misshaped": (dict(reshape={EXPERT_WO: (4, 31, 24)}),
                  [f"target.{EXPERT_WO.replace('/', '.')}",
                   f"'{EXPERT_WO}' has shape (4, 31, 24), expected (4, 32, 24)"]),
    "gated": (dict(add={"encoder/layers_0/mlp/wi_0/kernel": np.zeros((24, 32))}), ["'encoder/layers_0/mlp/wi_0/kernel'",
                                                                                    "gated"]),
    "moe_layout": (dict(drop=["encoder/layers_0/mlp/wi/kernel", "encoder/layers_0/mlp/wo/kernel",
                              "encoder/layers_1/mlp/expert/wi/kernel", "encoder/layers_1/mlp/expert/wo/kernel",
                              "encoder/layers_1/mlp/router/router_weights/w/kernel"],
                        add={"encoder/layers_0/mlp/expert/wi/kernel": np.zeros((4, 24, 32)),
                             "encoder/layers_0/mlp/expert/wo/kernel": np.zeros((4, 32, 24)),
                             "encoder/layers_0/mlp/router/router_weights/w/kernel": np.zeros((4, 24)),
                             "encoder/layers_1/mlp/wi/kernel": np.zeros((24, 32)),
                             "encoder/layers_1/mlp/wo/kernel": np.zeros((32, 24))}),
                   ["encoder's MoE layers are [0, 3] of 4; a model with 2 places them at [1, 3]"]),
    "scanned": (dict(drop_prefix="encoder/layers_", add={"encoder/encoder/mlp/wi/kernel": np.zeros((24, 4, 32))}),
                ["no 'encoder/layers_<i>/' parameters", "scanned"]),
    "no_embedding": (dict(drop=["token_embedder/embedding"]), ["cannot infer vocab_size and d_model",
                                                               "'token_embedder/embedding' is missing", "config="]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_checkpoint_is_named(tmp_path, case):
    edits, messages = BAD[case]
    step = write_t5x(tmp_path / "checkpoint_1", _edit(flaxformer_params("base_like"), **edits))
    with pytest.raises(CheckpointError) as err:
        load_t5x(step)
    assert str(step) in str(err.value)
    for m in messages:
        assert m in str(err.value), str(err.value)


def test_bad_files_are_named(tmp_path, base_f32):
    step = tmp_path / "checkpoint_1000"
    shutil.copytree(base_f32 / "checkpoint_1000", step)
    message = (f"{step / 'target.token_embedder.embedding'}: parameter 'token_embedder/embedding' has shape "
               "(64, 24), expected (128, 32)")
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_t5x(step, config="tiny")  # a preset whose shapes differ
    array = step / "target.decoder.layers_3.mlp.expert.wi.kernel"
    shutil.rmtree(array)
    with pytest.raises(CheckpointError, match=re.escape(f"{array}: array directory of parameter "
                                                        "'decoder/layers_3/mlp/expert/wi/kernel' is missing")):
        load_t5x(step)
    (step / "checkpoint").write_bytes(b"\x81\xa1x")  # a truncated msgpack map
    with pytest.raises(CheckpointError, match=re.escape(f"{step / 'checkpoint'}: not a readable T5X msgpack")):
        load_t5x(step)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a T5X checkpoint"):
        load_t5x(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="neither a preset"):
        load_t5x(base_f32, config="switch-nonexistent")
