"""Smoke checks of the command-line jobs: the main job (infer.py) and the benchmark's CPU configuration."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from pregated_jax import SwitchTransformer, get_preset, save_pretrained
from pregated_jax.loading import load_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def t5_vocab_model(tmp_path_factory):
    """A small random pre-gated model over the full T5 vocabulary, as a Hugging Face directory."""
    path = tmp_path_factory.mktemp("ckpt") / "model"
    save_pretrained(SwitchTransformer(get_preset("tiny", vocab_size=32128, routing="pregated"), rngs=nnx.Rngs(0)), path)
    return path


def test_infer_generates_and_reports(t5_vocab_model, tmp_path):
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "infer.py"), "--checkpoint", str(t5_vocab_model),
                           "--text", "summarize: a tool that converts address books", "--text", "summarize: x",
                           "--max_new_tokens", "5", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| end-to-end |" in proc.stdout and "engine mode pregated" in proc.stderr
    doc = json.loads(out.read_text())
    assert len(doc["results"]) == 2 and doc["stats"][0]["new_tokens"] == 10
    # The CLI's outputs are greedy tokens, decoded: the plain library path must give the same text.
    from pregated_jax.data.tokenizer import default_tokenizer
    from pregated_jax.generation import generate

    tok = default_tokenizer()
    ids = tok.encode("summarize: x")
    expected = tok.decode(generate(load_model(t5_vocab_model), np.array([ids]), max_new_tokens=5)[0].tolist())
    assert doc["results"][1]["output"] == expected and expected


def test_infer_rejects_missing_file(t5_vocab_model):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "infer.py"), "--checkpoint", str(t5_vocab_model),
                           "--file", "/nonexistent/inputs.txt"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "/nonexistent/inputs.txt" in (proc.stderr + proc.stdout)


def test_load_model_names_a_missing_path():
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        load_model("/tmp/does_not_exist")


def test_benchmark_tiny_smoke(tmp_path):
    peer = []
    try:
        import accelerate  # noqa: F401
        import transformers  # noqa: F401
        peer = ["--peer-modes", "on-demand"]
    except ImportError:
        peer = ["--peer-modes"]
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--tiny", "--out", str(tmp_path),
                           "--modes", "gpu-only", "pregated", "speculative", "--batches", "1", "--beams", "2",
                           "--repeats", "1", *peer], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "results.json").read_text())
    rows = [r for r in doc["rows"] if r["impl"] == "pregated-jax"]
    assert not [r for r in doc["rows"] if "error" in r], doc["rows"]
    assert {r["mode"] for r in rows} == {"gpu-only", "pregated", "speculative"}
    assert all(r["new_tokens"] == 4 and r["decode_tokens_per_s"] > 0 for r in rows)
    assert (tmp_path / "results.md").exists() and (tmp_path / "chart.png").exists()
    if peer[-1] == "on-demand":
        assert any(r["impl"] == "hf-transformers" for r in doc["rows"])


def test_train_then_export_then_infer_round_trip(tmp_path):
    """An Orbax training run -> export_hf.py -> load_model: the same params, and the CLI runs on it."""
    from pregated_jax.train import load_model as load_orbax
    from pregated_jax.train import train_and_evaluate
    from pregated_jax.train.config import config_from_py

    cfg = config_from_py(str(ROOT / "configs" / "tiny.py"), [("training.num_steps", "2"), ("training.eval_every", "1000"),
                                                          ("training.checkpoint_every", "2")])
    train_and_evaluate(cfg, tmp_path / "run")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "export_hf.py"), "--checkpoint", str(tmp_path / "run"),
                           "--out", str(tmp_path / "hf")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = nnx.state(load_orbax(tmp_path / "run"), nnx.Param)
    b = nnx.state(load_model(tmp_path / "hf"), nnx.Param)
    for (pa, va), (pb, vb) in zip(nnx.to_flat_state(a), nnx.to_flat_state(b)):
        assert pa == pb
        np.testing.assert_array_equal(va.get_value(), vb.get_value(), err_msg=str(pa))
    assert (tmp_path / "hf" / "spiece.model").exists()
