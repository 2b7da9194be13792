"""MetricsWriter: metrics.jsonl always; TensorBoard scalars read back by tensorboard's own EventAccumulator."""

import json
import logging
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
