"""Smoke checks of the command-line jobs: the main job (infer.py) and the benchmark's CPU configuration."""

import dataclasses
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from pregated_jax import EngineConfig, SwitchTransformer, get_preset, save_pretrained
from pregated_jax.loading import load_model

ROOT = Path(__file__).resolve().parents[1]


def _load_script(name: str):
    """scripts/<name>.py as a module."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
                           "--max_new_tokens", "5", "--decode_steps_per_call", "2", "--json", str(out)],
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


@pytest.mark.parametrize("source", ["file", "text", "stdin"])
def test_infer_rejects_blank_input_instead_of_running_the_demo(t5_vocab_model, tmp_path, source):
    """Blank input given by the user is an error (exit 2) naming where it came from; the demo inputs are
    only for no input at all."""
    blank, out = tmp_path / "blank.txt", tmp_path / "out.json"
    blank.write_text("\n   \n\t\n")
    given = {"file": ["--file", str(blank)], "text": ["--text", "  "], "stdin": []}[source]
    stdin = {"input": " \n\n"} if source == "stdin" else {"stdin": subprocess.DEVNULL}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "infer.py"), "--checkpoint", str(t5_vocab_model),
                           *given, "--max_new_tokens", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, **stdin)
    assert proc.returncode == 2, proc.stderr[-2000:]
    named = {"file": str(blank), "text": "--text number 1", "stdin": "standard input"}[source]
    assert "nothing to generate from" in proc.stderr and named in proc.stderr and not out.exists()


@pytest.mark.parametrize("budget, message", [
    ("0.000001", r"device_budget_bytes=1073 \(.*\) is below the \d+ bytes .* allowed: >= \d+ bytes"),
    ("-1", r"device_budget_bytes must be >= 0 \(or None: unbounded\), got -1073741824")])
def test_infer_refuses_a_device_budget_too_small_for_the_mode(t5_vocab_model, budget, message):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "infer.py"), "--checkpoint", str(t5_vocab_model),
                           "--text", "summarize: x", "--max_new_tokens", "2", "--device_budget_gib", budget],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and re.search(rf"^error: {message}", proc.stderr, re.M), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_load_model_names_a_missing_path():
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        load_model("/tmp/does_not_exist")


def test_load_model_on_a_folder_without_a_model_says_what_it_looked_for(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "7").mkdir()  # a step-like folder without params: not an Orbax checkpoint either
    with pytest.raises(FileNotFoundError, match=rf"^no model in {re.escape(str(tmp_path))} \(config.json is there, "
                                                r"but no weights file\): looked for Hugging Face weights "
                                                r"\(model.safetensors, .*pytorch_model.bin.*\), a T5X checkpoint "
                                                r".*an Orbax checkpoint of ours \(<step>/params"):
        load_model(tmp_path)


def test_export_hf_follows_the_umask(t5_vocab_model, tmp_path):
    import os
    import stat

    old = os.umask(0o027)
    try:
        _load_script("export_hf").main(["--checkpoint", str(t5_vocab_model), "--out", str(tmp_path / "out")])
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()} == {
        "config.json": 0o640, "model.safetensors": 0o640, "spiece.model": 0o640}


def test_infer_argument_errors_come_before_loading_and_generating(tmp_path, monkeypatch, capsys):
    """Each is one error line, before any model is loaded: counts below 1, a --json folder that is missing, a
    --checkpoint that is missing or holds no model."""
    for name in ("XLA_FLAGS", "CUDA_MODULE_LOADING"):  # main() sets them for the process
        monkeypatch.delenv(name, raising=False)
    infer = _load_script("infer")
    loaded = []
    monkeypatch.setattr("pregated_jax.loading.load_model", lambda *a, **k: loaded.append(a) or load_model(*a, **k))
    usage = [(["--batch_size", "0"], "--batch_size must be >= 1, got 0"),
             (["--max_input_len", "0"], "--max_input_len must be >= 1, got 0"),
             (["--num_beams", "-2"], "--num_beams must be >= 1, got -2"),
             (["--json", str(tmp_path / "nodir" / "out.json")],
              f"--json {tmp_path / 'nodir' / 'out.json'}: folder {tmp_path / 'nodir'} does not exist"),
             (["--json", str(tmp_path)], f"--json {tmp_path} is a directory")]
    for args, message in usage:
        with pytest.raises(SystemExit) as exit_:
            infer.main(["--text", "summarize: x", *args])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and f"error: {message}" in err, (args, err)
    for checkpoint, message in [(tmp_path / "missing", f"checkpoint path {tmp_path / 'missing'} does not exist"),
                                (tmp_path, f"no model in {tmp_path}: looked for")]:
        with pytest.raises(SystemExit, match=rf"^error: {re.escape(message)}"):
            infer.main(["--text", "summarize: x", "--checkpoint", str(checkpoint)])
    assert len(loaded) == 2  # only the two checkpoint cases reached loading


@pytest.mark.slow
def test_benchmark_tiny_smoke(tmp_path):
    peer = []
    try:
        import accelerate  # noqa: F401
        import transformers  # noqa: F401
        peer = ["--peer_modes", "on-demand"]
    except ImportError:
        peer = ["--peer_modes"]
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--tiny", "--out", str(tmp_path),
                           "--modes", "gpu-only", "pregated", "speculative", "--batches", "1", "--beams", "2",
                           "--repeats", "2", "--guess_first_block", "on", "--decode_steps_per_call", "3", *peer],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "results.json").read_text())
    rows = [r for r in doc["rows"] if r["impl"] == "pregated-jax"]
    assert not [r for r in doc["rows"] if "error" in r], doc["rows"]
    assert {r["mode"] for r in rows} == {"gpu-only", "pregated", "speculative"}
    # each worker ran the flags' EngineConfig in its own mode, with every step run (stop_when_finished off)
    expected = dataclasses.asdict(EngineConfig(guess_first_block=True, decode_steps_per_call=3,
                                               stop_when_finished=False))
    assert all(r["engine_config"] == dict(expected, mode=r["mode"]) for r in rows)
    assert all(r["guess_first_block"] == "on" and r["decode_steps_per_call"] == 3 for r in rows)
    assert all(r["new_tokens"] == 4 and r["decode_tokens_per_s"] > 0 for r in rows)
    assert all(r["dma_wait"] is None for r in rows if r["copy_method"] != "dma")  # the wait mode only with DMA
    for r in rows:  # every timed run is kept, and the row's rates are those of one of them (the best)
        assert len(r["decode_tokens_per_s_runs"]) == len(r["end_to_end_tokens_per_s_runs"]) == 2
        assert r["end_to_end_tokens_per_s"] == max(r["end_to_end_tokens_per_s_runs"])
        assert r["decode_tokens_per_s"] in r["decode_tokens_per_s_runs"]
        # each run's ratio to the roofline, the reported one among them
        assert len(r["decode_over_roofline_runs"]) == 2
        assert r["decode_over_roofline"] in r["decode_over_roofline_runs"]
        assert r["decode_over_roofline"] == pytest.approx(r["decode_s"] / r["roofline_decode_s"])
    assert (tmp_path / "results.md").exists() and (tmp_path / "chart.png").exists()
    assert "Decode / roofline of every timed run" in (tmp_path / "results.md").read_text()
    if peer[-1] == "on-demand":
        assert any(r["impl"] == "hf-transformers" for r in doc["rows"])


def test_benchmark_plot_only_redraws_a_version_1_run_and_names_a_missing_one(tmp_path):
    """--plot_only on a results.json of the first layout (no version, no decode_bytes_needed, only the best run
    kept), and on an empty folder; a sweep's default --out is not under docs/."""
    old = [{k: v for k, v in _bench_row(mode, s, decode_bytes_moved=int(5.2e9)).items() if k != "decode_bytes_needed"}
           for mode, s in (("gpu-only", 0.05), ("pregated", 0.15))]
    (tmp_path / "results.json").write_text(json.dumps(dict(command="python scripts/benchmark.py", input_len=256,
                                                           machine={"device": "H100", "jax": "0"}, new_tokens=64,
                                                           started="2026-01-01 00:00:00", rows=old)))
    script = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--plot_only", "--out"]
    proc = subprocess.run(script + [str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    md = (tmp_path / "results.md").read_text()
    # roofline = max(gpu-only's 0.05 s, the 5.2 GB moved / 52 GB/s = 0.1 s): 0.15 s is 1.5 times it
    assert "| switch-base-8 | pregated-jax | pregated | 1 | 1 | 10.0 | 426.7 | 400.0 | - | 1.50 |" in md
    assert "best of the timed runs." in md and "_runs" not in md and (tmp_path / "chart.png").exists()
    assert json.loads((tmp_path / "results.json").read_text())["version"] == 2
    missing = tmp_path / "nothing_here"
    proc = subprocess.run(script + [str(missing)], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and f"no results.json in {missing}" in proc.stderr
    assert not missing.exists()
    assert _load_script("benchmark").parse_args(["--tiny"]).out is None  # a sweep writes into benchmark-results/


def _bench_row(mode, decode_s, impl="pregated-jax", **kw):
    row = dict(preset="switch-base-8", impl=impl, mode=mode, batch=1, num_beams=1, prefill_s=0.01, decode_s=decode_s,
               decode_tokens_per_s=64 / decode_s, end_to_end_tokens_per_s=64 / (decode_s + 0.01), bytes_moved=0,
               decode_bytes_moved=0, decode_bytes_needed=0, prefill_experts_copied=0, expert_bytes=1,
               peak_device_bytes=2**30)
    return dict(row, **kw)


def test_benchmark_merge_replaces_rows_drops_superseded_failures_and_recomputes_ratios(tmp_path):
    """--merge: a later run's row wins, a failed worker's row goes once another run has that worker's rows, and
    the roofline and peer ratios pair rows of the merged table (hand-computed here)."""
    def run(name, rows, input_len=256):
        (tmp_path / name).mkdir()
        doc = dict(command=f"python scripts/benchmark.py ({name})", machine={"device": "H100", "jax": "0"},
                   input_len=input_len, new_tokens=64, started=f"2026-11-24 {name}", rows=rows)
        (tmp_path / name / "results.json").write_text(json.dumps(doc))
        return str(tmp_path / name)

    early = run("early", [_bench_row("gpu-only", 0.2), _bench_row("pregated", 9.9),
                          _bench_row("speculative", 0.4, decode_over_roofline=99.0),  # stale: against 0.2 s
                          _bench_row("pregated", 0.5, batch=8, decode_over_roofline=99.0),  # no gpu-only at batch 8
                          dict(preset="switch-base-8", impl="pregated-jax", mode="on-demand", error="timeout")])
    late = run("late", [_bench_row("gpu-only", 0.1),
                        _bench_row("pregated", 0.15, decode_bytes_needed=int(10.4e9), bytes_moved=int(10.4e9)),
                        _bench_row("on-demand", 0.3),
                        dict(_bench_row("on-demand", 1.0, impl="hf-transformers"), tokens_per_s=20.0)])
    out = tmp_path / "sweep"
    script = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--merge"]
    proc = subprocess.run(script + [early, late, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((out / "results.json").read_text())
    rows = {(r["impl"], r["mode"], r["batch"]): r for r in doc["rows"]}
    assert len(doc["rows"]) == len(rows) == 6 and not any("error" in r for r in doc["rows"])
    assert [(r["mode"], r["batch"]) for r in doc["rows"]] == [("gpu-only", 1), ("on-demand", 1), ("pregated", 1),
                                                             ("pregated", 8), ("speculative", 1), ("on-demand", 1)]
    assert [r["source"] for r in doc["rows"]] == ["../late"] * 3 + ["../early"] * 2 + ["../late"]
    assert "decode_over_roofline" not in rows[("pregated-jax", "pregated", 8)]  # no partner: no stale ratio
    assert [s["folder"] for s in doc["sources"]] == ["../early", "../late"]
    pregated = rows[("pregated-jax", "pregated", 1)]
    # roofline = max(gpu-only's 0.1 s, 10.4 GB / 52 GB/s = 0.2 s)
    assert pregated["roofline_decode_s"] == pytest.approx(0.2)
    assert pregated["decode_over_roofline"] == pytest.approx(0.75)
    assert pregated["speedup_vs_hf_on_demand"] == pytest.approx(64 / 0.16 / 20.0)
    assert rows[("pregated-jax", "speculative", 1)]["decode_over_roofline"] == pytest.approx(4.0)  # against late's 0.1 s
    md = (out / "results.md").read_text()
    assert "[../early](../early/results.md)" in md and "| ../late |" in md and (out / "chart.png").exists()

    other = run("other", [_bench_row("gpu-only", 0.1)], input_len=128)
    proc = subprocess.run(script + [early, other, "--out", str(tmp_path / "bad")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "results.json ran 128 input / 64 new tokens" in proc.stderr
    proc = subprocess.run(script + [early, str(tmp_path / "none"), "--out", str(tmp_path / "bad")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and f"no results.json in {tmp_path / 'none'}" in proc.stderr


@pytest.mark.slow
def test_train_then_export_then_infer_round_trip(tmp_path):
    """An Orbax training run -> export_hf.py -> load_model: the same params, and the CLI runs on it."""
    from pregated_jax.train import restore_model, train_and_evaluate
    from pregated_jax.train.config import config_from_py

    cfg = config_from_py(str(ROOT / "configs" / "tiny.py"), [("training.num_steps", "2"), ("training.eval_every", "1000"),
                                                          ("training.checkpoint_every", "2")])
    train_and_evaluate(cfg, tmp_path / "run")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "export_hf.py"), "--checkpoint", str(tmp_path / "run"),
                           "--out", str(tmp_path / "hf")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = nnx.state(restore_model(tmp_path / "run"), nnx.Param)
    b = nnx.state(load_model(tmp_path / "hf"), nnx.Param)
    for (pa, va), (pb, vb) in zip(nnx.to_flat_state(a), nnx.to_flat_state(b)):
        assert pa == pb
        np.testing.assert_array_equal(va.get_value(), vb.get_value(), err_msg=str(pa))
    assert (tmp_path / "hf" / "spiece.model").exists()


def test_quality_report_from_run_metrics(tmp_path):
    """The quality experiment's report: the ROUGE table, the step counts and the curves' raw data."""
    qe = _load_script("quality_experiment")
    work, out = tmp_path / "work", tmp_path / "out"
    out.mkdir()
    runs = {}
    for n, name in enumerate(qe.RUNS):
        (work / name).mkdir(parents=True)
        lines = [{"step": 10, "train/cross_entropy": 5.0 - n}, {"step": 20, "eval/cross_entropy": 4.5 - n}]
        (work / name / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
        runs[name] = {"steps": 20 if name != "converted" else 5, "final_train_loss": 5.0 - n,
                      "final_eval_loss": 4.5 - n, "rouge": {"rouge1": 30.0 + n, "rouge2": 10.0, "rougeL": 25.5},
                      "steps_per_s": 2.0, "examples_per_s": 16.0, "train_cmd": f"scripts/train.py {name}",
                      "eval_cmd": f"scripts/evaluate.py {name}"}
    state = {"runs": runs, "machine": {"device": "cpu", "jax": "x"}, "command": "c", "gin_file": "g",
             "eval_examples": 7}
    qe.write_report(state, work, out, 20)
    table = (out / "results.md").read_text()
    assert "| conventional | 20 | 30.00 | 10.00 | 25.50 | 5.000 | 4.500 |" in table
    assert "| pregated | 20 | 31.00 |" in table
    assert "| converted | 20 + 5 | 32.00 |" in table
    assert json.loads((out / "results.json").read_text())["runs"]["pregated"]["rouge"]["rouge1"] == 31.0
    assert (out / "metrics_converted.jsonl").read_text() == (work / "converted" / "metrics.jsonl").read_text()
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_random_benchmark_model_experts_are_distinct_nonzero_and_scaled():
    """Benchmark weights: experts built in host memory from windows of a shared pool must still differ
    from each other, contain no zeros and have the fan-in scale."""
    from pregated_jax.bench.random_model import random_model
    from pregated_jax.model import param_shapes

    cfg = get_preset("tiny", routing="pregated", dtype="float32")
    model = random_model(cfg, seed=0, experts_on_host=True)
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    expert_leaves = [p for p in param_shapes(cfg) if len(p) >= 2 and p[-2] == "experts"]
    assert expert_leaves
    for path in expert_leaves:
        leaf = state
        for k in path:
            leaf = leaf[k]
        w = np.asarray(leaf, np.float32)  # [E, fan_in, fan_out]
        assert np.all(w != 0), path
        flat = w.reshape(w.shape[0], -1)
        assert len({row.tobytes() for row in flat}) == w.shape[0], f"identical experts in {path}"
        np.testing.assert_allclose(w.std(), w.shape[-2] ** -0.5, rtol=0.1)


def test_random_benchmark_model_quantizes_experts_before_they_reach_host_memory():
    """random_model(expert_dtype=int8): every host stack is the engine's own int8 conversion of the bf16 draws
    (so a benchmark row measures the same weights), host memory holds only the quantized bytes, and the
    engine takes those stacks without converting them again: its tokens equal the engine's on the bf16 model
    quantized at build."""
    from pregated_jax import quant
    from pregated_jax.bench.random_model import random_model
    from pregated_jax.engine import InferenceEngine
    from pregated_jax.model import param_shapes

    cfg = get_preset("tiny", routing="pregated", dtype="float32")
    plain = random_model(cfg, seed=0, experts_on_host=True)
    stored = random_model(cfg, seed=0, experts_on_host=True, expert_dtype="int8")
    plain_state = dict(nnx.to_flat_state(nnx.state(plain, nnx.Param)))
    stored_state = dict(nnx.to_flat_state(nnx.state(stored, nnx.Param)))
    experts = [p for p in param_shapes(cfg) if len(p) >= 2 and p[-2] == "experts"]
    for path in experts:
        q = stored_state[path][...]
        assert isinstance(q, quant.QuantizedExperts) and q.format == "int8", path
        want = quant.quantize(np.asarray(plain_state[path][...]), "int8")
        np.testing.assert_array_equal(np.asarray(q.values), want.values, err_msg=str(path))
        np.testing.assert_array_equal(np.asarray(q.scales), want.scales, err_msg=str(path))
        assert q.nbytes < 0.3 * np.asarray(plain_state[path][...]).nbytes  # int8 + scales vs float32
    ids = np.random.default_rng(0).integers(2, 100, (1, 12), dtype=np.int32)
    got = InferenceEngine(stored, mode="pregated", expert_dtype="int8").generate(ids, max_new_tokens=4)
    ref = InferenceEngine(plain, mode="pregated", expert_dtype="int8").generate(ids, max_new_tokens=4)
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    with pytest.raises(ValueError, match="unknown expert dtype"):
        random_model(cfg, expert_dtype="int3")


def test_running_out_of_pinned_host_memory_names_the_stack_and_the_limit(monkeypatch):
    """XLA's pinned host pool running out (its allocator error) becomes a MemoryError naming the stack, its
    size and XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB; other runtime errors pass through unchanged."""
    import jax

    from pregated_jax import memory

    def exhausted(value, sharding):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of host memory while trying to allocate 512.00MiB "
                                         "with allocator xla_gpu_host_bfc on device 0.")

    monkeypatch.setattr(jax, "device_put", exhausted)
    monkeypatch.delenv(memory.HOST_LIMIT_VAR, raising=False)
    w = np.zeros((4, 256, 512), np.float32)  # 2 MiB
    with pytest.raises(MemoryError, match=r"decoder\.block\.1\.wi: 0\.00 GiB .*XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB "
                                          r"unset: 64 GB"):
        memory.put_on_host(w, None, "decoder.block.1.wi")
    monkeypatch.setenv(memory.HOST_LIMIT_VAR, "100")
    with pytest.raises(MemoryError, match="XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB=100"):
        memory.put_on_host(w, None)

    def other(value, sharding):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")

    monkeypatch.setattr(jax, "device_put", other)
    with pytest.raises(jax.errors.JaxRuntimeError, match="something else"):
        memory.put_on_host(w, None)
