"""The inference engine on a mesh (`InferenceEngine(model, config, mesh=...)`) against the single-device engine.

The 8-device checks run in a subprocess of this file with 8 fake CPU devices, which reports tokens, counters
and shardings as JSON; the tests assert on them. The model is the bundled pre-gated one (trained: its greedy
outputs are real synopses, so a wrong expert changes tokens), and a tiny conventional one for speculative
mode. Independent references: the single-device engine's tokens in the same mode, and its experts-copied
counter run on each data group's rows (every device of a group copies exactly its own experts of what the
group routes).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fake_devices import fake_device_env

NUM_DEVICES = 8
TEXTS = ["A library for parsing and writing JSON documents in C, with a streaming API.",
         "Command-line tool to download files over HTTP and FTP, resuming interrupted transfers.",
         "Fonts for the Tamil script.",
         "Python bindings for the GNOME keyring: store and retrieve passwords from scripts."]


# --- 8-device worker (runs in the subprocess) ------------------------------------------------------

def _worker() -> dict:
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    from flax import nnx

    import pregated_jax as pj
    from pregated_jax.config import get_preset
    from pregated_jax.data.tokenizer import default_tokenizer
    from pregated_jax.engine import EngineConfig, InferenceEngine
    from pregated_jax.model import SwitchTransformer

    model = pj.load_model("default", dtype="float32")
    tok = default_tokenizer()
    encoded = [tok.encode(t, add_eos=True) for t in TEXTS]
    length = max(map(len, encoded))
    ids = np.zeros((len(TEXTS), length), np.int32)
    mask = np.zeros_like(ids)
    for row, e in enumerate(encoded):
        ids[row, :len(e)], mask[row, :len(e)] = e, 1
    out: dict = {"cases": {}, "errors": {}}

    single_engines: dict = {}  # one single-device engine per (model, config), reused for every row subset

    def generate(m, mesh, rows=slice(None), new=12, beams=1, **config):
        if mesh is None:
            key = (id(m), tuple(sorted(config.items())))
            if key not in single_engines:
                single_engines[key] = InferenceEngine(m, EngineConfig(**config))
            engine = single_engines[key]
        else:
            engine = InferenceEngine(m, EngineConfig(**config), mesh=mesh)
        vocab = m.config.vocab_size
        res = engine.generate(ids[rows] % vocab, mask[rows], max_new_tokens=new, num_beams=beams)
        return engine, res

    def case(name, m, shape, rows=slice(None), beams=1, single_config=None, **config):
        """Tokens and counters on the mesh, the single-device engine's in the same mode, and the single-device
        experts-copied counter summed over the mesh's data groups (each run on that group's rows alone)."""
        mesh = pj.make_mesh(*shape)
        engine, res = generate(m, mesh, rows, beams=beams, **config)
        single = dict(config if single_config is None else single_config)
        _, ref = generate(m, None, rows, beams=beams, **single)
        picked = np.arange(len(TEXTS))[rows]
        groups = np.array_split(np.concatenate([picked, np.repeat(picked[-1:], -len(picked) % shape[0])]),
                                shape[0])
        # every data group runs as many steps as the mesh (until every row of the mesh has finished)
        steps, whole = res.stats.steps, {**single, "stop_when_finished": False}
        per_group = sum(generate(m, None, g, new=steps, beams=beams, **whole)[1].stats.experts_copied for g in groups)
        out["cases"][name] = {
            "tokens": res.tokens.tolist(), "single_tokens": ref.tokens.tolist(),
            "copied": res.stats.experts_copied, "single_copied_per_group": per_group,
            "cache": [res.stats.cache_hits, res.stats.cache_misses],
            "local_experts": engine.num_experts,
            "expert_tokens": res.stats.expert_tokens, "single_expert_tokens": ref.stats.expert_tokens,
            "device_tokens": res.stats.device_tokens,
        }
        return engine

    for shape in ((1, 8), (2, 4)):
        for mode in ("gpu-only", "on-demand", "prefetch-all", "pregated"):
            engine = case(f"{mode} {shape}", model, shape, mode=mode)
            if mode == "pregated" and shape == (2, 4):
                b = engine.program.encoder.blocks[engine.program.encoder.moe_blocks[0]]
                out["host_stack"] = {"memory_kind": b.host_wi.sharding.memory_kind,
                                     "shard_rows": sorted({s.data.shape[0] for s in b.host_wi.addressable_shards}),
                                     "devices": len(b.host_wi.sharding.device_set)}
    case("pregated (8, 1)", model, (8, 1), mode="pregated")
    case("pregated 3 rows (2, 4)", model, (2, 4), rows=slice(0, 3), mode="pregated")
    # 3 rows: a decode step routes at most 3 of the 8 experts, so it goes through the cache (4 would not)
    case("pregated lifo cache (1, 8)", model, (1, 8), rows=slice(0, 3), mode="pregated", cache_policy="lifo", cache_experts=1,
         single_config={"mode": "pregated"})
    case("pregated lifo cache (2, 4)", model, (2, 4), rows=slice(0, 3), mode="pregated", cache_policy="lifo", cache_experts=2,
         single_config={"mode": "pregated"})
    case("pregated beams (2, 4)", model, (2, 4), beams=2, mode="pregated")
    eb = InferenceEngine(model, EngineConfig(mode="pregated")).expert_bytes
    case("pregated streamed under a budget (2, 4)", model, (2, 4), mode="pregated", device_budget_bytes=4 * eb,
         single_config={"mode": "pregated"})
    case("pregated int8 (2, 4)", model, (2, 4), mode="pregated", expert_dtype="int8")
    # a load-balanced placement decides which device holds which expert; the tokens do not change
    from pregated_jax.expert_placement import apply_placement, moe_block_names

    placed = pj.load_model("default", dtype="float32")
    rng = np.random.default_rng(3)
    perms = {name: rng.permutation(8) for name in moe_block_names(placed.config)}
    apply_placement(placed, perms)
    engine = case("pregated placed (2, 4)", placed, (2, 4), mode="pregated", record_routing=True)
    out["perms"] = {name: p.tolist() for name, p in perms.items()}
    first = engine.program.encoder.moe_blocks[0]
    held = {}  # mesh position (data, expert) -> the stack rows that device holds
    for shard in engine.program.encoder.blocks[first].host_wi.addressable_shards:
        held[tuple(int(np.argwhere(engine.layout.mesh.devices == shard.device)[0][k]) for k in (0, 1))] = shard.data
    logical = np.asarray(model.encoder.blocks[first].experts.wi[...])  # the unplaced model: row e = expert e
    perm = perms[f"encoder/{first}"]
    out["placed_rows"] = all(np.array_equal(np.asarray(held[(d, j)]), logical[perm[2 * j:2 * j + 2]])
                             for d in range(2) for j in range(4))
    conventional = SwitchTransformer(get_preset("tiny", num_experts=8, expert_capacity=None), rngs=nnx.Rngs(1))
    conventional.eval()
    case("speculative (2, 4)", conventional, (2, 4), mode="speculative")

    mesh = pj.make_mesh(1, 8)
    for name, kwargs in (("dma", {"copy_method": "dma"}), ("guess", {"guess_first_block": True})):
        try:
            InferenceEngine(model, EngineConfig(mode="pregated", **kwargs), mesh=mesh)
        except ValueError as e:
            out["errors"][name] = str(e)
    try:
        InferenceEngine(model, EngineConfig(), mesh=pj.make_mesh(1, 3))
    except ValueError as e:
        out["errors"]["split"] = str(e)
    try:
        InferenceEngine(model, EngineConfig(), mesh=mesh, device=jax.devices()[0])
    except ValueError as e:
        out["errors"]["both"] = str(e)
    return out


# --- the tests (this process) ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def results():
    proc = subprocess.run([sys.executable, __file__, "worker"], env=fake_device_env(NUM_DEVICES),
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"worker failed:\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


CASES = [f"{mode} {shape}" for shape in ((1, 8), (2, 4)) for mode in ("gpu-only", "on-demand", "prefetch-all",
                                                                       "pregated")]
CASES += ["pregated (8, 1)", "pregated 3 rows (2, 4)", "pregated lifo cache (1, 8)", "pregated lifo cache (2, 4)",
          "pregated beams (2, 4)", "pregated streamed under a budget (2, 4)", "pregated int8 (2, 4)",
          "pregated placed (2, 4)", "speculative (2, 4)"]


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_mesh_engine_generates_the_single_device_tokens(results, name):
    c = results["cases"][name]
    assert c["tokens"] == c["single_tokens"]
    assert len({tuple(row) for row in c["tokens"]}) > 1 or name.startswith("speculative")  # real, varied outputs


@pytest.mark.slow
@pytest.mark.parametrize("name", ["on-demand (1, 8)", "pregated (1, 8)", "on-demand (2, 4)", "pregated (2, 4)",
                                  "prefetch-all (1, 8)", "prefetch-all (2, 4)",
                                  "pregated (8, 1)", "pregated 3 rows (2, 4)", "pregated beams (2, 4)",
                                  "pregated int8 (2, 4)", "pregated placed (2, 4)", "speculative (2, 4)"])
def test_each_device_copies_exactly_its_own_routed_experts(results, name):
    """Summed over the mesh, the experts copied equal the single-device engine's count on each data group's rows:
    every routed expert is copied once per group, by the device that holds it, and no other."""
    c = results["cases"][name]
    assert c["copied"] == c["single_copied_per_group"] > 0


@pytest.mark.slow
def test_resident_experts_are_never_copied(results):
    assert results["cases"]["gpu-only (1, 8)"]["copied"] == results["cases"]["gpu-only (2, 4)"]["copied"] == 0


@pytest.mark.slow
def test_experts_live_split_over_the_expert_axis_in_host_memory(results):
    assert results["host_stack"] == {"memory_kind": "pinned_host", "shard_rows": [2], "devices": 8}
    assert results["cases"]["pregated (2, 4)"]["local_experts"] == 2
    assert results["cases"]["pregated (1, 8)"]["local_experts"] == 1


@pytest.mark.slow
def test_a_placement_decides_which_device_holds_which_expert(results):
    """Under a load-balanced placement, device j of the expert axis holds stack rows 2j, 2j+1 of the placement's
    order: logical experts perm[2j], perm[2j+1] (the tokens stay the single-device ones: the case above)."""
    assert results["placed_rows"] is True


@pytest.mark.slow
def test_routing_statistics_give_each_devices_load_under_the_placement(results):
    """The tokens per logical expert equal the single-device engine's; each device's load is the sum over the
    experts the placement put on it (device j holds perm[2j], perm[2j+1]), and covers every routed token."""
    c = results["cases"]["pregated placed (2, 4)"]
    tokens = np.asarray(c["expert_tokens"])  # [MoE blocks, E]
    assert tokens.shape == (4, 8) and np.array_equal(tokens, np.asarray(c["single_expert_tokens"]))
    for b, perm in enumerate(results["perms"].values()):
        expected = [tokens[b, perm[2 * j]] + tokens[b, perm[2 * j + 1]] for j in range(4)]
        assert c["device_tokens"][b] == expected
        assert sum(c["device_tokens"][b]) == tokens[b].sum() > 0


@pytest.mark.slow
def test_per_device_cache_hits_after_the_first_fill(results):
    """One slot per device on (1, 8) holds the device's only expert: after each block's first fill, every lookup
    hits; misses are at most one per device and MoE block."""
    hits, misses = results["cases"]["pregated lifo cache (1, 8)"]["cache"]
    assert 0 < misses <= 8 * 4 and hits > misses
    hits2, misses2 = results["cases"]["pregated lifo cache (2, 4)"]["cache"]
    assert misses2 > 0 and hits2 > 0


@pytest.mark.slow
def test_mesh_options_that_need_one_device_are_refused(results):
    errors = results["errors"]
    assert "copy_method='dma'" in errors["dma"]
    assert "guess_first_block" in errors["guess"]
    assert "8 experts do not split over the mesh axis expert=3" in errors["split"]
    assert "not both" in errors["both"]


# --- the scripts' --mesh ------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_infer_json_results_are_the_same_with_and_without_the_mesh(tmp_path):
    outputs = {}
    for name, mesh in (("one", []), ("mesh", ["--mesh", "data=2,expert=4"])):
        out = tmp_path / f"{name}.json"
        texts = [a for t in TEXTS[:3] for a in ("--text", t)]
        proc = subprocess.run([sys.executable, "-m", "pregated_jax.infer", *texts, "--max_new_tokens", "10",
                               "--json", str(out), *mesh], env=fake_device_env(NUM_DEVICES), cwd=ROOT,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs[name] = json.loads(out.read_text())
    assert outputs["mesh"]["results"] == outputs["one"]["results"]
    assert all(r["output"] for r in outputs["one"]["results"])


@pytest.mark.slow
def test_benchmark_runs_its_workers_on_the_mesh(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--tiny", "--out", str(tmp_path),
                           "--modes", "gpu-only", "pregated", "--batches", "2", "--beams", "1", "--repeats", "1",
                           "--peer_modes", "--mesh", "data=2,expert=4"], env=fake_device_env(NUM_DEVICES),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert not [r for r in rows if "error" in r], rows
    assert {r["mode"] for r in rows} == {"gpu-only", "pregated"}
    assert all(r["mesh"] == {"data": 2, "expert": 4} and r["devices"] == 8 for r in rows)
    assert all(r["decode_tokens_per_s"] > 0 for r in rows)
    assert [r["experts_copied"] > 0 for r in sorted(rows, key=lambda r: r["mode"])] == [False, True]


def test_scripts_refuse_a_bad_mesh_before_loading_anything():
    from pregated_jax.cli import infer

    for mesh, message in (("data=3", "needs 3 devices"), ("model=2", "NAME=SIZE")):
        with pytest.raises(SystemExit, match=message):
            infer.main(["--text", "x", "--mesh", mesh])


if __name__ == "__main__" and sys.argv[1:] == ["worker"]:
    print(json.dumps(_worker()))
