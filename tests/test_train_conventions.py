"""t5x and ml_collections habits of the training front end: --gin_bindings, --gin_search_paths, the MODEL_DIR
macro, unused bindings as errors, `--config path.py:ARG`, remote workdirs refused early, task names checked when
the config is built, the resolved config and the metrics logged, async checkpointing as an option."""

import dataclasses
import io
import itertools
import logging
import sys
from pathlib import Path

import gin
import pytest

from pregated_jax.cli import train as train_cli
from pregated_jax.train import DataConfig, TrainConfig, config_from_gin, train_and_evaluate
from pregated_jax.train import loop as train_loop
from test_train import BASE, random_batch

REPO = Path(__file__).resolve().parent.parent


@gin.configurable
def not_read_by_training(x=1):  # a registered configurable that training never calls
    return x


def test_gin_bindings_search_paths_and_model_dir(tmp_path, monkeypatch):
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "mine.gin").write_text("include 'tiny.gin'\nTrainingConfig.num_steps = %STEPS\n"
                                    "DataConfig.data_dir = %MODEL_DIR\n")
    monkeypatch.chdir(tmp_path)  # mine.gin is found through the search path, tiny.gin in the shipped configs
    cfg, workdir, operative = train_cli.parse_args(
        ["--gin_file", "mine.gin", "--gin_search_paths", f"{tmp_path},{extra}", "--gin_bindings", "STEPS = 3",
         "--gin.TrainingConfig.seed=4", "--gin_bindings", "OptimizerConfig.name = 'adamw'", "--workdir", "run"])
    assert (cfg.training.num_steps, cfg.training.seed, cfg.optimizer.name) == (3, 4, "adamw")
    assert cfg.data.data_dir == str(tmp_path / "run") and workdir == Path("run")
    assert cfg.model.preset == "tiny" and "TrainingConfig.num_steps = %STEPS" in operative
    # gin wraps a long value onto the next line: compare with whitespace and line continuations removed
    assert f"MODEL_DIR='{tmp_path / 'run'}'" in "".join(operative.replace("\\\n", "").split())


def test_unused_gin_bindings_and_bad_search_paths_are_errors(tmp_path):
    tiny = REPO / "configs/tiny.gin"
    with pytest.raises(ValueError, match=r"gin binding 'UNUSED = 1' is not used: no gin file or binding refers "
                                         r"to the macro %UNUSED"):
        config_from_gin([tiny], ["UNUSED = 1"])
    with pytest.raises(ValueError, match=r"gin binding 'not_read_by_training.x = 2' is not used: training reads "
                                         r"only the configurables \['DataConfig', "):
        config_from_gin([tiny], ["not_read_by_training.x = 2"])
    with pytest.raises(ValueError, match=f"gin search path '{tmp_path / 'nope'}' is not a folder"):
        config_from_gin([tiny], search_paths=[tmp_path / "nope"])
    cfg, _ = config_from_gin([tiny], ["USED = 5", "TrainingConfig.seed = %USED"])  # a macro a binding uses
    assert cfg.training.seed == 5


def test_config_file_with_an_argument(tmp_path, capsys):
    path = tmp_path / "cfg.py"
    path.write_text("from pregated_jax.train.config import TrainConfig, TrainingConfig\n\n"
                    "def get_config(arg='8'):\n    return TrainConfig(training=TrainingConfig(num_steps=int(arg)))\n")
    cfg, _, _ = train_cli.parse_args(["--config", f"{path}:5", "--config.training.seed=2", "--workdir", "w"])
    assert (cfg.training.num_steps, cfg.training.seed) == (5, 2)
    assert train_cli.parse_args(["--config", str(path), "--workdir", "w"])[0].training.num_steps == 8
    with pytest.raises(SystemExit, match=r"error: .*tiny\.py: get_config\(\) takes no argument, but the config "
                                         r"was given one: '3'"):
        train_cli.main(["--config", "tiny.py:3", "--workdir", str(tmp_path / "w")])


def test_remote_workdir_is_refused_before_anything_runs(capsys):
    with pytest.raises(SystemExit) as exit_:
        train_cli.parse_args(["--config", "tiny.py", "--workdir", "gs://bucket/run"])
    assert exit_.value.code == 2
    assert "--workdir gs://bucket/run: remote workdirs are not supported" in capsys.readouterr().err


def test_unknown_task_is_rejected_when_the_config_is_built():
    message = r"DataConfig.task must be one of \['debian', 'xsum', 'squad', 'web_questions', 'local'\], got 'xsumm'"
    with pytest.raises(ValueError, match=message):
        DataConfig(task="xsumm")
    with pytest.raises(ValueError, match=message):
        config_from_gin([REPO / "configs/tiny.gin"], ["DataConfig.task = 'xsumm'"])
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict({"data": {"task": "xsumm"}})


@pytest.mark.slow  # ~40 s on two cores, mostly compilation
def test_config_and_metrics_logged_and_synchronous_checkpoints(tmp_path, monkeypatch, caplog):
    """Without a terminal on stdout, every log_every-th step's metrics go to `logging`; the resolved config
    is logged at start-up; async_checkpointing=False reaches the checkpoint store."""
    stores = []

    class Store(train_loop.CheckpointStore):
        def __init__(self, directory, keep, async_save=True):
            stores.append(async_save)
            super().__init__(directory, keep, async_save=async_save)

    monkeypatch.setattr(train_loop, "CheckpointStore", Store)
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # not a terminal
    config = BASE.replace(training=dataclasses.replace(BASE.training, num_steps=4, log_every=2, checkpoint_every=4,
                                                       async_checkpointing=False))
    with caplog.at_level(logging.INFO, logger="pregated_jax.train.loop"):
        train_and_evaluate(config, tmp_path, itertools.repeat(random_batch()))
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"workdir {tmp_path}, resolved config: {{") and '"async_checkpointing": false' in m
               for m in messages)
    steps = [m.split(":")[0] for m in messages if m.startswith("step ")]
    assert steps == ["step 2", "step 4"]
    assert any(m.startswith("step 4: train/accuracy=") and "train/loss=" in m for m in messages)
    assert stores == [False] and (tmp_path / "checkpoints/4").is_dir()
