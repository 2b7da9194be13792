"""scripts/mesh_benchmark.py: the training sweep on 8 fake CPU devices (a subprocess), and its argument checks.

The smoke run uses strong scaling (global batch 8 on meshes 1x1 and 2x4), so that every row trains on the
same batches and its first loss must equal the one-device row's; dropout is off (on the mesh the experts'
dropout masks differ from one device's). A skewed router (--skew 0.5) makes greedy placement's effect
visible on the 8-expert tiny model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fake_devices import fake_device_env

from pregated_jax.bench import mesh_train

ROOT = Path(__file__).resolve().parent.parent
BATCH, LENGTH, LOAD_STEPS, NEW = 8, 16, 2, 4
ARGS = ["--cpu_devices", "8", "--meshes", "1x1", "2x4", "--preset", "tiny", "--num_experts", "8",
        "--global_batch", str(BATCH), "--input_len", str(LENGTH), "--target_len", str(LENGTH),
        "--warmup", "2", "--steps", "2", "--load_steps", str(LOAD_STEPS), "--placement", "none", "greedy",
        "--skew", "0.5", "--dropout_rate", "0", "--sweeps", "train", "infer", "--modes", "pregated",
        "--new_tokens", str(NEW)]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("mesh")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "mesh_benchmark.py"), *ARGS, "--out", str(out)],
                          env=fake_device_env(8), capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, f"mesh_benchmark failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads((out / "results.json").read_text()), (out / "results.md").read_text(), proc.stdout


@pytest.mark.slow
@pytest.mark.slow
def test_smoke_run_reports_every_row(smoke):
    report, md, stdout = smoke
    assert report["machine"]["device_count"] == 8 and report["machine"]["platform"] == "cpu"
    assert report["machine"]["jax"] and "mesh_benchmark.py" in report["command"] and "--skew" in report["command"]
    rows = report["train"]["rows"]
    # placement needs 2+ expert devices: 1x1 runs unplaced only
    assert [(r["mesh"], r["placement"]) for r in rows] == [("1x1", "none"), ("2x4", "none"), ("2x4", "greedy")]
    assert report["train"]["reference"] == {"mesh": "1x1", "placement": "none"}
    for r in rows:
        assert r["global_batch"] == BATCH and r["tokens_per_step"] == BATCH * 2 * LENGTH
        assert r["steps_per_s"] > 0 and len(r["raw"]["window_s"]) == 1 and len(r["raw"]["losses"]) == 4
        assert r["tokens_per_s"] == pytest.approx(r["steps_per_s"] * BATCH * 2 * LENGTH)
        assert r["tokens_per_s_per_device"] == pytest.approx(r["tokens_per_s"] / r["devices"])
        assert r["scaling_efficiency"] == pytest.approx(r["tokens_per_s_per_device"]
                                                        / rows[0]["tokens_per_s_per_device"])
        assert f"| {r['mesh']} | {r['devices']} | {r['placement']} |" in md
    assert "steps/s" in stdout and "2x4 greedy" in stdout  # progress lines and the printed table


@pytest.mark.slow
def test_loads_count_every_routed_token(smoke):
    """Dropless tiny model, no padding: each MoE block's device loads sum to load_steps x batch x length."""
    rows = smoke[0]["train"]["rows"]
    for r in rows:
        load = r["load"]
        assert load["steps"] == LOAD_STEPS and load["expert_devices"] == r["expert"]
        assert sorted(load["blocks"]) == ["decoder/1", "decoder/3", "encoder/1", "encoder/3"]
        for b, x in load["blocks"].items():
            assert len(x["devices"]) == r["expert"]
            assert sum(x["devices"]) == sum(x["experts"]) == LOAD_STEPS * BATCH * LENGTH, (r["mesh"], b)
            assert 1.0 <= x["lower_bound"] <= x["max_over_mean"] + 1e-9
    assert rows[0]["load"]["max_over_mean"] == 1.0  # one device holds every expert


@pytest.mark.slow
def test_greedy_placement_balances_and_keeps_the_loss(smoke):
    rows = {(r["mesh"], r["placement"]): r for r in smoke[0]["train"]["rows"]}
    none, greedy = rows["2x4", "none"], rows["2x4", "greedy"]
    assert greedy["load"]["max_over_mean"] < none["load"]["max_over_mean"]
    for b, perm in greedy["placement_perm"].items():
        assert sorted(perm) == list(range(8))
        assert none["placement_perm"][b] == list(range(8))
    assert any(p != list(range(8)) for p in greedy["placement_perm"].values())
    # placement permutes the expert stacks only: the routing (logical experts' counts) is unchanged
    for b in none["load"]["blocks"]:
        assert none["load"]["blocks"][b]["experts"] == greedy["load"]["blocks"][b]["experts"]
    # the same global batches on every row: one device's loss on every mesh, placed or not
    first = rows["1x1", "none"]["first_loss"]
    for r in rows.values():
        assert abs(r["first_loss"] - first) < 1e-5, (r["mesh"], r["placement"])
    # later steps too, up to float summation order in the updates
    np.testing.assert_allclose(greedy["raw"]["losses"], none["raw"]["losses"], atol=1e-4)


@pytest.mark.slow
def test_inference_rows_count_every_routed_token_and_placement_balances(smoke):
    """The engine on each mesh: a tiny dropless model routes every position once per MoE block, so each block's
    device loads sum to batch x input length (encoder) or batch x new tokens (decoder); greedy placement,
    planned from the unplaced row's recorded routing, lowers the 2x4 imbalance."""
    report, md, _ = smoke
    rows = {(r["mesh"], r["placement"]): r for r in report["infer"]["rows"]}
    assert list(rows) == [("1x1", "none"), ("2x4", "none"), ("2x4", "greedy")]
    for (mesh, _), r in rows.items():
        assert r["mode"] == "pregated" and r["decode_tokens_per_s"] > 0 and r["experts_copied"] > 0
        loads = np.asarray(r["load"]["devices"])  # [MoE blocks: encoder 2, decoder 2, expert devices]
        assert loads.shape == (4, r["expert"])
        assert loads.sum(1).tolist() == [BATCH * LENGTH] * 2 + [BATCH * NEW] * 2
        assert f"| {mesh} | {r['devices']} | pregated |" in md
    assert rows["2x4", "greedy"]["load"]["max_over_mean"] < rows["2x4", "none"]["load"]["max_over_mean"]
    assert rows["1x1", "none"]["load"]["max_over_mean"] == 1.0


# --- argument checks (no devices) -----------------------------------------------------------------------

def _args(*argv: str) -> argparse.Namespace:
    ap = mesh_train.build_parser()
    a = ap.parse_args(list(argv))
    mesh_train.check_args(ap, a)
    return a


def test_mesh_shapes_and_batches():
    assert mesh_train.parse_mesh_shape("2x4") == (2, 4)
    for bad in ("2x", "0x4", "2*4"):
        with pytest.raises(argparse.ArgumentTypeError, match="DATAxEXPERT"):
            mesh_train.parse_mesh_shape(bad)
    assert mesh_train.mesh_shapes(_args(), 8) == [(1, 1), (1, 2), (1, 4), (1, 8)]
    assert mesh_train.mesh_shapes(_args("--devices", "1", "4"), 4) == [(1, 1), (1, 4)]
    with pytest.raises(ValueError, match="mesh 2x4 needs 8 devices; 4 are available"):
        mesh_train.mesh_shapes(_args("--meshes", "1x1", "2x4"), 4)
    weak, strong = _args("--per_device_batch", "3"), _args("--global_batch", "8")
    assert mesh_train.global_batch(weak, (2, 4)) == 24 and mesh_train.global_batch(strong, (2, 4)) == 8
    cfg = mesh_train.model_config(_args("--num_experts", "8"))
    with pytest.raises(ValueError, match="mesh 1x3: 8 experts do not split over expert=3"):
        mesh_train.check_shapes(weak, cfg, [(1, 3)])
    with pytest.raises(ValueError, match="mesh 2x4: global batch 6 does not divide over its 8 devices"):
        mesh_train.check_shapes(_args("--global_batch", "6"), cfg, [(2, 4)])


def test_bad_arguments_are_refused(capsys):
    for argv, message in ((["--warmup", "0"], "--warmup must be >= 1"),
                          (["--warmup", "2", "--calib_steps", "3"], "--calib_steps 3 exceeds --warmup 2"),
                          (["--per_device_batch", "0"], "--per_device_batch must be >= 1, got 0"),
                          (["--skew", "-1"], "--skew must be >= 0")):
        with pytest.raises(SystemExit):
            _args(*argv)
        assert message in capsys.readouterr().err


def test_efficiency_is_relative_to_the_fewest_devices_unplaced():
    failed = {"mesh": "1x1", "devices": 1, "placement": "none", "error": "XlaRuntimeError: out of memory\n..."}
    rows = [failed, {"mesh": "1x2", "devices": 2, "placement": "none", "tokens_per_s_per_device": 100.0},
            {"mesh": "1x4", "devices": 4, "placement": "greedy", "tokens_per_s_per_device": 90.0}]
    assert mesh_train.add_efficiency(rows) == {"mesh": "1x2", "placement": "none"}  # the failed row is skipped
    assert [r.get("scaling_efficiency") for r in rows] == [None, 1.0, 0.9]
    table = mesh_train.train_table({"rows": [failed]}).splitlines()
    assert table[2] == "| 1x1 | 1 | none | failed: XlaRuntimeError: out of memory |" + " |" * 7
    assert table[2].count("|") == table[0].count("|")
