"""Training: config front-ends, the loop, exact resume, checkpoints readable by plain Orbax, error paths.

Every run uses the tiny preset shrunk further (2+2 layers, all MoE, d_model 16, vocab 64, no dropout:
dropout's RNG triples XLA compile time on CPU; router jitter still draws from the RNG state) on random
batches.
"""

import dataclasses
import importlib.util
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from pregated_jax.train import (ModelConfig, OptimizerConfig, TrainConfig, apply_override,
                                build_model, config_from_gin, config_from_py, load_params, restore_model,
                                train_and_evaluate)
from pregated_jax.train.optim import make_schedule

REPO = Path(__file__).resolve().parent.parent
SMALL = {"vocab_size": 64, "d_model": 16, "d_ff": 32, "d_kv": 8, "num_heads": 2, "num_layers": 2,
         "num_decoder_layers": 2, "num_sparse_encoder_layers": 2, "num_sparse_decoder_layers": 2,
         "dropout_rate": 0.0}


def random_batch(seed: int = 0, b: int = 4, s: int = 12, t: int = 6, vocab: int = 64) -> dict:
    """A batch in the data pipeline's format, with some padding on both sides."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(2, vocab, (b, t)).astype(np.int32)  # [B, T]
    dec_mask = np.ones((b, t), np.int32)
    dec_mask[1:, -2:] = 0
    labels[dec_mask == 0] = 0
    enc_mask = np.ones((b, s), np.int32)
    enc_mask[0, -4:] = 0
    input_ids = rng.integers(2, vocab, (b, s)).astype(np.int32) * enc_mask  # [B, S]
    decoder_input_ids = np.concatenate([np.zeros((b, 1), np.int32), labels[:, :-1]], axis=1)  # [B, T]
    return {"input_ids": input_ids, "attention_mask": enc_mask, "decoder_input_ids": decoder_input_ids,
            "labels": labels, "decoder_attention_mask": dec_mask}


def small(config: TrainConfig, **training) -> TrainConfig:
    """`config` with the shrunk model and a short, fully logged run."""
    base = dict(batch_size=4, max_input_len=12, max_target_len=6, num_steps=8, eval_every=100,
                checkpoint_every=3, keep_checkpoints=5, log_every=1, tensorboard=False)
    return config.replace(model=ModelConfig("tiny", SMALL),
                          training=dataclasses.replace(config.training, **{**base, **training}))


def run(config, workdir, batches=None, **kw) -> tuple[dict, list[tuple[int, float]]]:
    """Trains on `batches` (default: one fixed batch repeated); returns (final metrics, [(step, loss)])."""
    losses = []
    callback = kw.pop("step_callback", None)

    def record(step, metrics):
        losses.append((step, metrics["train/loss"]))
        if callback is not None:
            callback(step, metrics)

    batches = itertools.repeat(random_batch()) if batches is None else batches
    final = train_and_evaluate(config, workdir, batches, step_callback=record, **kw)
    return final, losses


BASE = small(TrainConfig(optimizer=OptimizerConfig(learning_rate=1e-2)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An uninterrupted 8-step run: (workdir, [(step, loss)])."""
    workdir = tmp_path_factory.mktemp("full")
    _, losses = run(BASE, workdir, batches=lambda step: random_batch(step))
    return workdir, losses


# --- configs ---------------------------------------------------------------------------------------

def test_gin_and_py_configs_resolve_equal():
    from_gin, operative = config_from_gin([REPO / "configs/tiny.gin"], ["TrainingConfig.num_steps = 7"])
    from_py = config_from_py(REPO / "configs/tiny.py", {"training.num_steps": "7"})
    assert from_gin == from_py
    assert from_py.training.num_steps == 7 and "TrainingConfig.num_steps = 7" in operative
    assert TrainConfig.from_dict(json.loads(json.dumps(from_py.to_dict()))) == from_py


def test_finetune_and_debian_configs_resolve():
    for task in ("xsum", "squad", "web_questions"):
        for model in ("base8", "base128", "large128"):
            cfg, _ = config_from_gin([REPO / f"configs/finetune/{task}_{model}.gin"])
            assert cfg.data.task == task and cfg.init.convert_to_pregated
            assert (cfg.training.batch_size, cfg.training.max_input_len, cfg.training.num_steps) == (256, 256, 2048)
            opt = cfg.optimizer
            assert (opt.name, opt.learning_rate, opt.schedule) == ("adafactor", 1e-4, "constant")
            assert cfg.model.preset.startswith("switch-") and cfg.init.from_checkpoint
    cfg, _ = config_from_gin([REPO / "configs/debian_small.gin"], ["ROUTING = 'pregated'"])
    m = cfg.model_config()
    assert (m.d_model, m.num_experts, m.num_layers, m.routing) == (256, 8, 4, "pregated")


def test_unknown_gin_binding_and_config_field_fail():
    with pytest.raises(ValueError, match="TrainingConfig.*num_stepz"):
        config_from_gin([REPO / "configs/tiny.gin"], ["TrainingConfig.num_stepz = 3"])
    with pytest.raises(ValueError, match="No configurable matching 'Bogus'"):
        config_from_gin([REPO / "configs/tiny.gin"], ["Bogus.x = 3"])
    with pytest.raises(ValueError, match=r"optimizer\.lr"):
        config_from_py(REPO / "configs/tiny.py", {"optimizer.lr": "3e-4"})
    with pytest.raises(ValueError, match=r"model\.overrides\.d_modle"):
        config_from_py(REPO / "configs/tiny.py", {"model.overrides.d_modle": "8"})
    with pytest.raises(ValueError, match="not a int"):
        config_from_py(REPO / "configs/tiny.py", {"training.num_steps": "many"})
    cfg = apply_override(BASE, "optimizer.grad_clip_norm", "None")
    cfg = apply_override(cfg, "model.overrides.routing", "pregated")
    assert cfg.optimizer.grad_clip_norm is None and cfg.model_config().routing == "pregated"


def test_cli_arguments():
    spec = importlib.util.spec_from_file_location("train_script", REPO / "scripts/train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    cfg, workdir, gin_text = script.parse_args(
        ["--config", str(REPO / "configs/tiny.py"), "--config.optimizer.learning_rate=3e-4",
         "--config.training.seed", "5", "--workdir", "/tmp/x"])
    assert (cfg.optimizer.learning_rate, cfg.training.seed, gin_text) == (3e-4, 5, None)
    cfg, _, gin_text = script.parse_args(["--gin_file", str(REPO / "configs/tiny.gin"),
                                          "--gin.OptimizerConfig.name='adamw'", "--workdir", "/tmp/x"])
    assert cfg.optimizer.name == "adamw" and "OptimizerConfig.name = 'adamw'" in gin_text
    with pytest.raises(SystemExit):
        script.parse_args(["--config", str(REPO / "configs/tiny.py"), "--bogus=1", "--workdir", "/tmp/x"])


def test_schedules():
    opt = OptimizerConfig(learning_rate=1.0, warmup_steps=4)
    const = make_schedule(opt, 100)
    rsqrt = make_schedule(dataclasses.replace(opt, schedule="linear_warmup_rsqrt"), 100)
    cos = make_schedule(dataclasses.replace(opt, schedule="cosine"), 100)
    np.testing.assert_allclose([const(s) for s in (0, 3, 50)], [0.25, 1.0, 1.0])
    np.testing.assert_allclose([rsqrt(s) for s in (0, 3, 15)], [0.25, 1.0, 0.5])
    assert float(cos(4)) == pytest.approx(1.0) and float(cos(100)) == pytest.approx(0.0, abs=1e-6)


# --- training ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("front_end", ["gin", "py"])
def test_config_files_train_and_loss_decreases(front_end, tmp_path):
    if front_end == "gin":
        cfg, _ = config_from_gin([REPO / "configs/tiny.gin"])
    else:
        cfg = config_from_py(REPO / "configs/tiny.py")
    cfg = small(cfg, eval_every=8)
    final, losses = run(cfg, tmp_path, eval_batches=[random_batch()])
    assert [s for s, _ in losses] == list(range(1, 9))
    assert losses[-1][1] < losses[0][1] - 0.1, losses
    assert np.isfinite(final["eval/loss"]) and final["step"] == 8
    saved = json.loads((tmp_path / "config.json").read_text())
    assert TrainConfig.from_dict(saved["train_config"]) == cfg
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 8 + 1  # + one eval line


def test_resume_after_kill_is_bit_exact(trained, tmp_path):
    _, full = trained

    class Killed(Exception):
        pass

    killed = []

    def kill(step, metrics):
        killed.append((step, metrics["train/loss"]))
        if step == 7:  # checkpoints exist for steps 3 and 6; step 7's progress is lost
            raise Killed

    with pytest.raises(Killed):
        run(BASE, tmp_path, batches=lambda step: random_batch(step), step_callback=kill)
    assert killed == full[:7]
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [3, 6]
    final, resumed = run(BASE, tmp_path, batches=lambda step: random_batch(step))
    assert [s for s, _ in resumed] == [7, 8]  # restarted from the step-6 checkpoint
    assert resumed == full[6:], (resumed, full)  # bit for bit
    assert final["step"] == 8
    # metrics.jsonl: one line per step (step 7, logged before the kill, is not repeated), the same losses
    # as the uninterrupted run's file
    def logged(workdir):
        lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
        return [(m["step"], m.get("train/loss"), "eval/loss" in m) for m in lines]

    assert logged(tmp_path) == logged(trained[0])
    assert [s for s, _, is_eval in logged(tmp_path) if not is_eval] == list(range(1, 9))


def test_resume_skips_consumed_batches_of_an_iterator(trained, tmp_path):
    """An iterable (not a step -> batch function) is fast-forwarded past the batches already trained on."""
    _, full = trained

    def kill(step, _):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(BASE, tmp_path, batches=map(random_batch, itertools.count()), step_callback=kill)
    _, resumed = run(BASE, tmp_path, batches=map(random_batch, itertools.count()))
    assert resumed == full[3:]


def test_params_restore_with_plain_orbax_in_subprocess(trained, tmp_path):
    workdir, _ = trained
    step = max(int(p.name) for p in (workdir / "checkpoints").iterdir())
    script = (
        "import sys, numpy as np, orbax.checkpoint as ocp\n"
        "tree = ocp.StandardCheckpointer().restore(sys.argv[1])\n"
        "flat = {}\n"
        "def walk(t, pre):\n"
        "    for k, v in t.items():\n"
        "        if isinstance(v, dict):\n"
        "            walk(v, pre + (k,))\n"
        "        else:\n"
        "            flat['.'.join(pre + (k,))] = np.asarray(v)\n"
        "walk(tree, ())\n"
        "assert not [m for m in sys.modules if m.startswith('pregated_jax')]\n"
        "np.savez(sys.argv[2], **flat)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = tmp_path / "params.npz"
    subprocess.run([sys.executable, "-c", script, str(workdir / "checkpoints" / str(step) / "params"), str(out)],
                   cwd=tmp_path, env=env, check=True, capture_output=True)
    foreign = dict(np.load(out))
    model = restore_model(workdir)
    ours = {".".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert sorted(foreign) == sorted(ours)
    for k in ours:
        np.testing.assert_array_equal(foreign[k], ours[k], err_msg=k)
    loaded = load_params(workdir / "checkpoints" / str(step))
    np.testing.assert_array_equal(loaded["encoder"]["blocks"]["1"]["experts"]["wi"],
                                  ours["encoder.blocks.1.experts.wi"])
    assert model.config == BASE.model_config()


def test_restore_into_other_shape_names_param_and_shapes(trained):
    workdir, _ = trained
    other = BASE.replace(model=ModelConfig("tiny", {**SMALL, "d_ff": 48}))
    with pytest.raises(ValueError, match=r"experts\.wi: checkpoint shape \(4, 16, 32\), model shape \(4, 16, 48\)"):
        train_and_evaluate(other, workdir, itertools.repeat(random_batch()))
    saved = json.loads((workdir / "config.json").read_text())  # the failed attempt left the run alone
    assert saved["model_config"]["d_ff"] == 32


def test_non_finite_loss_stops_naming_step_and_value(tmp_path):
    def batches(step):  # step 3 (0-based 2) has label ids past the vocabulary: its cross-entropy is NaN
        batch = random_batch(step)
        return {**batch, "labels": batch["labels"] + 1000} if step == 2 else batch

    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 3: nan"):
        run(BASE, tmp_path, batches=batches)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == []


@pytest.mark.slow
def test_pregate_finetune_from_checkpoint(trained, tmp_path):
    pytest.importorskip("pregated_jax.convert", reason="pregated_jax.convert (to_pregated) is not available")
    workdir, _ = trained
    cfg = small(BASE, num_steps=2).replace(
        init=dataclasses.replace(BASE.init, from_checkpoint=str(workdir), convert_to_pregated=True),
        model=ModelConfig("tiny", {"dtype": "bfloat16"}))  # bf16 compute on top of the checkpoint
    model = build_model(cfg)
    assert (model.config.routing, model.config.dtype) == ("pregated", "bfloat16")
    src = load_params(workdir)
    for stack in ("encoder", "decoder"):  # blocks 0 and 1 are MoE: 0 keeps its gate, its pre-gate is 1's gate
        blocks, old = getattr(model, stack).blocks, src[stack]["blocks"]
        np.testing.assert_array_equal(blocks[0].router.classifier[...], old["0"]["router"]["classifier"])
        np.testing.assert_array_equal(blocks[0].pregate.classifier[...], old["1"]["router"]["classifier"])
        assert blocks[1].router is None and blocks[1].pregate is None
    final, losses = run(cfg, tmp_path)
    assert [s for s, _ in losses] == [1, 2] and all(np.isfinite(l) for _, l in losses)
    tuned = restore_model(tmp_path)
    assert tuned.config.routing == "pregated"
    assert all(v.get_value().dtype == np.float32  # float32 master weights under bf16 compute
               for _, v in nnx.to_flat_state(nnx.state(tuned, nnx.Param)))


def test_init_from_hugging_face_dir_with_conversion(tmp_path):
    hf = pytest.importorskip("pregated_jax.hf_checkpoint", reason="pregated_jax.hf_checkpoint is not available")
    pytest.importorskip("pregated_jax.convert", reason="pregated_jax.convert (to_pregated) is not available")
    source = build_model(BASE)  # a fresh conventional model, saved in HF format
    hf.save_pretrained(source, tmp_path / "hf")
    cfg = BASE.replace(init=dataclasses.replace(BASE.init, from_checkpoint=str(tmp_path / "hf"),
                                                convert_to_pregated=True))
    model = build_model(cfg)
    assert model.config == BASE.model_config().replace(routing="pregated")
    np.testing.assert_array_equal(model.decoder.blocks[0].pregate.classifier[...],
                                  source.decoder.blocks[1].router.classifier[...])


def _all_finite(tree) -> bool:
    return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree)
               if np.issubdtype(np.asarray(x).dtype, np.inexact))


def test_diverging_run_never_saves_a_non_finite_state(tmp_path):
    """A huge learning rate: an early loss is still finite while the gradients or updated params are not.
    The run stops naming that step before saving it; every checkpoint left is finite and a rerun resumes
    from the last of them (and stops at the same step)."""
    cfg = small(BASE, num_steps=6, checkpoint_every=1, log_every=1).replace(
        optimizer=OptimizerConfig(learning_rate=1e6))
    with pytest.raises(FloatingPointError, match=r"non-finite .* at step (\d+)") as err:
        run(cfg, tmp_path, batches=lambda step: random_batch(step))
    bad = int(re.search(r"at step (\d+)", str(err.value)).group(1))
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())
    assert bad > 1 and saved == list(range(1, bad)), (saved, str(err.value))
    for step in saved:
        assert _all_finite(ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / str(step) / "state"))
    resumed = []
    with pytest.raises(FloatingPointError, match=rf"at step {bad}\b"):
        run(cfg, tmp_path, batches=lambda step: random_batch(step),
            step_callback=lambda step, _: resumed.append(step))
    assert resumed == list(range(saved[-1] + 1, bad))  # from the last good checkpoint up to the bad step
    assert _all_finite(nnx.to_pure_dict(nnx.state(restore_model(tmp_path), nnx.Param)))


def _nan_params_checkpoint(workdir: Path) -> None:
    """An Orbax checkpoint of ours (step 1) whose params have NaN in one expert weight."""
    from pregated_jax.train.checkpoints import CheckpointStore
    params = nnx.to_pure_dict(nnx.state(build_model(BASE), nnx.Param))
    params = jax.tree.map(np.array, params)  # writable copies
    params["encoder"]["blocks"][1]["experts"]["wi"][0, 0, 0] = np.nan
    store = CheckpointStore(workdir / "checkpoints", keep=2, async_save=False)
    store.save(1, {"step": np.int32(1), "params": params, "opt_state": {}, "rngs": {}},
               {"model_config": dataclasses.asdict(BASE.model_config()), "train_config": BASE.to_dict()})
    store.wait()
    store.close()


def test_orbax_checkpoint_with_nan_is_refused_naming_the_param(tmp_path):
    _nan_params_checkpoint(tmp_path)
    match = r"checkpoint .*checkpoints/1.*tensor 'encoder\.blocks\.1\.experts\.wi' holds 1 non-finite"
    with pytest.raises(ValueError, match=match):
        restore_model(tmp_path)
    from pregated_jax import load_model
    with pytest.raises(ValueError, match=match):
        load_model(tmp_path)


def test_safetensors_with_nan_is_refused_naming_the_tensor(tmp_path):
    hf = pytest.importorskip("pregated_jax.hf_checkpoint")
    from safetensors.numpy import load_file, save_file
    from pregated_jax import load_model
    hf.save_pretrained(build_model(BASE), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    name = next(n for n in sorted(tensors) if "expert_" in n)
    tensors[name] = tensors[name].copy()
    tensors[name].flat[3] = np.inf
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=rf"model\.safetensors: tensor '{re.escape(name)}' holds 1 non-finite"):
        load_model(tmp_path)


def test_safetensors_with_overwritten_bytes_is_refused(tmp_path):
    """The tensor bytes of a safetensors file overwritten with 0xFF (same size, intact header) are NaN."""
    hf = pytest.importorskip("pregated_jax.hf_checkpoint")
    from pregated_jax import load_model
    hf.save_pretrained(build_model(BASE), tmp_path)
    file = tmp_path / "model.safetensors"
    raw = file.read_bytes()
    start = 8 + int.from_bytes(raw[:8], "little")
    file.write_bytes(raw[:start] + b"\xff" * (len(raw) - start))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor '[^']+' holds \d+ non-finite"):
        load_model(tmp_path)


# --- checkpoint folders that cannot be written -----------------------------------------------------

def _refuse_mkdir(monkeypatch, fragment: str) -> None:
    """os.mkdir fails with EACCES for paths containing `fragment`, as in a read-only folder (even as root)."""
    real = os.mkdir

    def mkdir(path, *args, **kwargs):
        if fragment in os.fspath(path):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)


@pytest.mark.parametrize("how", ["chmod", "mkdir refused"])
def test_unwritable_checkpoint_folder_fails_before_training(tmp_path, monkeypatch, how):
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    if how == "chmod":
        ckpt.chmod(0o555)
        if os.access(ckpt, os.W_OK):
            pytest.skip("running as root: a read-only mode does not stop writes")
    else:
        _refuse_mkdir(monkeypatch, str(ckpt) + os.sep)
    steps = []
    with pytest.raises(PermissionError, match=rf"^cannot write checkpoints to {re.escape(str(ckpt))}: "
                                              r".*Permission denied"):
        run(BASE, tmp_path, step_callback=lambda step, _: steps.append(step))
    assert steps == []  # refused before the first step
    spec = importlib.util.spec_from_file_location("train_script", REPO / "scripts/train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit, match=rf"^error: cannot write checkpoints to {re.escape(str(ckpt))}: "):
        script.main(["--gin_file", str(REPO / "configs/tiny.gin"), "--workdir", str(tmp_path)])


def test_failed_checkpoint_save_raises_at_once_and_leaves_no_thread_waiting(tmp_path, monkeypatch):
    """A step folder that cannot be created: `save` raises naming the folder and the cause, and no Orbax
    thread is left waiting for it (such a thread held the process's exit for 300 s)."""
    import threading
    import time
    from pregated_jax.train.checkpoints import CheckpointStore

    store = CheckpointStore(tmp_path / "checkpoints", keep=2)
    _refuse_mkdir(monkeypatch, "orbax-checkpoint-tmp")
    state = {"step": np.int32(1), "params": {"w": np.zeros(3, np.float32)}, "opt_state": {}, "rngs": {}}
    before = set(threading.enumerate())
    with pytest.raises(PermissionError, match=rf"checkpoint step 1 to {re.escape(str(tmp_path / 'checkpoints'))}: "
                                              r".*Permission denied.*1\.orbax-checkpoint-tmp"):
        store.save(1, state, {"model_config": {}, "train_config": {}})
        store.wait()
    deadline = time.monotonic() + 5
    while (left := [t for t in set(threading.enumerate()) - before if t.is_alive() and not t.daemon]) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == [], [t.name for t in left]
    store.close()


def test_config_values_of_the_wrong_type_are_one_error_line(tmp_path, capsys):
    """gin hands values over untyped: num_steps='abc' (or a float, or a string for a bool) is refused where the
    config is built, naming the field, the value and the type allowed; scripts/train.py prints it as one line."""
    spec = importlib.util.spec_from_file_location("train_script", REPO / "scripts/train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for binding, message in [("TrainingConfig.num_steps='abc'", "TrainingConfig.num_steps must be an integer, "
                                                                 "got 'abc' (a string)"),
                             ("TrainingConfig.batch_size=8.0", "TrainingConfig.batch_size must be an integer, got 8.0"),
                             ("TrainingConfig.tensorboard='false'", "TrainingConfig.tensorboard must be a boolean"),
                             ("DataConfig.train_path=3", "DataConfig.train_path must be a string or null/None, got 3"),
                             ("InitConfig.convert_to_pregated=1", "InitConfig.convert_to_pregated must be a boolean")]:
        with pytest.raises(SystemExit, match=rf"^error: {re.escape(message)}"):
            script.main(["--gin_file", str(REPO / "configs/tiny.gin"), f"--gin.{binding}",
                         "--workdir", str(tmp_path / "w")])
    assert not (tmp_path / "w").exists()
    with pytest.raises(ValueError, match=r"OptimizerConfig\.warmup_steps must be an integer, got '5'"):
        OptimizerConfig(warmup_steps="5")


# --- the grain input pipeline --------------------------------------------------------------------

def grain_batches(seen: list, pack: bool = True):
    """A fresh grain iterator over 40 token-id examples (packed batches of 4 rows of 12 + 6 tokens); every
    batch it yields is appended to `seen`."""
    from pregated_jax.data import default_tokenizer
    from pregated_jax.data.grain_pipeline import train_dataset

    rng = np.random.default_rng(0)
    examples = [{"inputs": rng.integers(2, 64, int(rng.integers(1, 6))).tolist() + [1],
                 "targets": rng.integers(2, 64, int(rng.integers(1, 3))).tolist() + [1]} for _ in range(40)]
    ds = train_dataset(examples, default_tokenizer(), 4, 12, 6, seed=0, pack=pack)
    return iter(ds.map(lambda b: (seen.append(b), b)[1]))


@pytest.mark.slow  # ~40 s on two CPU cores: three runs, packed batches compile once more
def test_grain_iterator_state_is_checkpointed_and_resume_does_not_replay(tmp_path):
    full_seen, killed_seen, resumed_seen = [], [], []
    _, full = run(BASE, tmp_path / "full", batches=grain_batches(full_seen))
    assert len(full_seen) == 8 and "encoder_segment_ids" in full_seen[0]

    def kill(step, _):
        if step == 7:  # checkpoints exist for steps 3 and 6; step 7's progress is lost
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(BASE, tmp_path / "run", batches=grain_batches(killed_seen), step_callback=kill)
    state_file = tmp_path / "run/checkpoints/6/data/process_0-of-1.json"
    assert json.loads(state_file.read_text())  # the iterator's state beside the Orbax items
    _, resumed = run(BASE, tmp_path / "run", batches=grain_batches(resumed_seen))
    assert resumed == full[6:]  # bit for bit
    assert len(resumed_seen) == 2  # only the batches of steps 7 and 8 were read: nothing replayed
    for got, want in zip(resumed_seen, full_seen[6:]):
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_default_batches_read_a_local_file_through_grain(tmp_path):
    from pregated_jax.train.config import DataConfig
    from pregated_jax.train.inputs import default_batches, is_stateful

    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"doc": "word " * (i % 4 + 1), "sum": "ok"}) + "\n"
                            for i in range(30)))
    cfg = BASE.replace(data=DataConfig(task="local", train_path=str(path), input_field="doc", target_field="sum",
                                       pack=True))
    train, evals = default_batches(cfg)
    assert is_stateful(train) and evals is None
    batch = next(train)
    assert batch["input_ids"].shape == (4, 12) and batch["decoder_segment_ids"].shape == (4, 6)
    assert batch["encoder_segment_ids"].max() >= 2  # short examples share rows
    halves = [next(default_batches(cfg, shard_index=i, shard_count=2)[0]) for i in range(2)]
    assert all(h["input_ids"].shape == (2, 12) for h in halves)


def test_first_non_finite_names_the_first_bad_array_of_params_then_optimizer_state():
    """The diverging-run error names the first params / optimizer-state array holding a NaN or infinity
    (integer leaves are skipped), checked with one jitted program."""
    from pregated_jax.train.loop import TrainState, _first_non_finite

    ok = jnp.ones((3,), jnp.float32)
    params = {"a": ok, "b": jnp.array([1.0, jnp.inf]), "c": jnp.array([jnp.nan])}
    opt = {"count": jnp.array(3, jnp.int32), "mu": {"a": jnp.array([jnp.nan])}}
    state = TrainState(jnp.zeros((), jnp.int32), params, opt, {})
    assert _first_non_finite(state) == "['params']['b']"
    state = TrainState(jnp.zeros((), jnp.int32), {"a": ok}, opt, {})
    assert _first_non_finite(state) == "['opt_state']['mu']['a']"
    assert _first_non_finite(TrainState(jnp.zeros((), jnp.int32), {"a": ok}, {"count": opt["count"]}, {})) is None


def test_relative_checkpoint_paths_reach_orbax_absolute(tmp_path, monkeypatch):
    """A relative workdir (as `scripts/quality_experiment.py` passes): newer Orbax refuses relative paths in its
    tensorstore writes, so the store and the readers hand Orbax absolute ones; the round trip works from a cwd."""
    from pregated_jax.train.checkpoints import CheckpointStore, load_params, step_dir
    monkeypatch.chdir(tmp_path)
    store = CheckpointStore("run/checkpoints", keep=1, async_save=False)
    assert store.directory == tmp_path / "run/checkpoints"
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    store.save(2, {"step": np.int32(2), "params": {"w": w}, "opt_state": {}, "rngs": {}},
               {"model_config": {}, "train_config": {}})
    store.wait()
    store.close()
    assert step_dir("run") == tmp_path / "run/checkpoints/2"
    np.testing.assert_array_equal(np.asarray(load_params("run")["w"]), w)
