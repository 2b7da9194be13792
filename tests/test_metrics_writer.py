"""MetricsWriter: metrics.jsonl always; TensorBoard scalars read back by tensorboard's own EventAccumulator."""

import json
import logging
import subprocess
import sys

import numpy as np
import pytest

from pregated_jax.train.loop import MetricsWriter

# (step, metrics): values exact in float32 (TensorBoard's simple_value), non-scalars for the JSONL only
STEPS = [
    (1, {"train/loss": 2.5, "train/accuracy": 0.125, "note": "warmup", "flag": True}),
    (2, {"train/loss": 1.75, "train/accuracy": 0.25, "eval/tokens": 96}),
    (4, {"train/loss": np.float64(0.5), "train/accuracy": 0.5, "rouge": [1.0, 2.0]}),
]


def test_tensorboard_events_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = MetricsWriter(tmp_path, tensorboard=True)
    for step, metrics in STEPS:
        writer.write(step, metrics)
    writer.close()

    logdir = tmp_path / "tensorboard"
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 1
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["eval/tokens", "train/accuracy", "train/loss"]  # numbers only
    read = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    assert read == {"train/loss": [(1, 2.5), (2, 1.75), (4, 0.5)],
                    "train/accuracy": [(1, 0.125), (2, 0.25), (4, 0.5)],
                    "eval/tokens": [(2, 96.0)]}
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": s, **m} for s, m in STEPS]


def test_without_tensorboard_package_jsonl_only(tmp_path, monkeypatch, caplog):
    for name in [m for m in sys.modules if m == "tensorboard" or m.startswith("tensorboard.")]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: the import raises ImportError
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # also when it was never imported
    with caplog.at_level(logging.WARNING):
        writer = MetricsWriter(tmp_path, tensorboard=True)
    for step, metrics in STEPS:
        writer.write(step, metrics)
    writer.close()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "pip install tensorboard" in warnings[0].getMessage()
    assert not (tmp_path / "tensorboard").exists()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == len(STEPS)


def test_tensorboard_off(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        writer = MetricsWriter(tmp_path, tensorboard=False)
        writer.write(1, {"train/loss": 1.0})
        writer.close()
    assert not caplog.records and not (tmp_path / "tensorboard").exists()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "train/loss": 1.0}


def test_resume_keeps_one_line_per_step_in_jsonl_and_tensorboard(tmp_path):
    """A run logs steps 1-5 and is killed (mid-line) after its step-3 checkpoint; the resumed run (start_step 3)
    logs 4-6 again: each step is in metrics.jsonl once, and TensorBoard shows the resumed run's values after 3."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = MetricsWriter(tmp_path, tensorboard=True)
    for step in range(1, 6):
        first.write(step, {"train/loss": float(step)})
    first.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "train/lo')  # the kill cut this line short
    resumed = MetricsWriter(tmp_path, tensorboard=True, start_step=3)
    for step in range(4, 7):
        resumed.write(step, {"train/loss": 10.0 * step})
    resumed.close()

    expected = [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["train/loss"]) for m in lines] == expected
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == expected


def test_tensorboard_events_leave_sys_modules_alone(tmp_path, monkeypatch):
    """Writing events replaces no module (tensorboard's TensorFlow switch, tensorboard.compat.notf, stays as it
    was), so TensorFlow's own summaries keep working in the process."""
    pytest.importorskip("tensorboard")
    monkeypatch.delitem(sys.modules, "tensorboard.compat.notf", raising=False)  # as in a fresh process
    before = {name: sys.modules.get(name) for name in ("tensorboard.compat.notf", "tensorflow")}
    writer = MetricsWriter(tmp_path, tensorboard=True)
    writer.write(1, {"train/loss": 1.0})
    writer.close()
    assert {name: sys.modules.get(name) for name in before} == before


@pytest.mark.slow
def test_tf_summary_works_after_training_metrics_in_the_same_process(tmp_path):
    pytest.importorskip("tensorflow")
    code = ("import sys; from pathlib import Path; from pregated_jax.train.loop import MetricsWriter\n"
            f"w = MetricsWriter(Path({str(tmp_path)!r}), tensorboard=True); w.write(1, {{'a': 1.0}}); w.close()\n"
            "import tensorflow as tf\n"
            f"with tf.summary.create_file_writer({str(tmp_path / 'tf')!r}).as_default():\n"
            "    assert tf.summary.scalar('x', 1.0, step=1)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
