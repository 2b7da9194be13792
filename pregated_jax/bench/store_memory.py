"""Host memory of an unquantized checkpoint vs quantized expert stores: how many bytes the experts take in each
format, and what a process that loads them for offloaded inference holds and peaks at.

Two parts:

- `store_bytes_table`: the exact bytes of every expert stack of a preset in each format (values + scales), from
  the shapes alone (`quant.expert_nbytes`, a `jax.eval_shape` of `quant.quantize`; no weights are built), with the
  ratio to bfloat16. This is what a store holds in host memory at any size, switch-large-128 and up.
- `measure`: for a preset that fits this machine, writes a bfloat16 Hugging Face checkpoint of a random model
  (`random_model`, real shapes) and int8 / int4 stores of the same weights through the project's own quantize
  path (`pregated_jax.cli.quantize.main`, i.e. scripts/quantize.py), then loads each one in a fresh
  subprocess the way the offload engine does (`pj.load_model(path, dtype="bfloat16", experts_on="host")`,
  nothing else built) and records the process's peak RSS (`ru_maxrss`), its RSS after the load (anonymous and
  file-backed), the bytes of the expert stacks it holds, and the file size; a baseline subprocess that only
  imports jax + pregated_jax and makes one array gives the runtime's own RSS, subtracted from the others.

Bound for host memory, a Hugging Face checkpoint's expert stacks are read in the compute dtype
(`model.loaded_param_dtype`: bfloat16 here), the engine's unquantized host bytes, the reference of every
ratio; the other params are float32 master weights in every row.

    python scripts/store_memory.py --preset switch-base-32 --formats int8,int4 --out /tmp/store-mem/out
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

TABLE_PRESETS = ("switch-base-8", "switch-base-32", "switch-base-128", "switch-large-128", "switch-xxl-128")
MB = 1e6


def _shapes(config) -> tuple[list[tuple[int, ...]], int]:
    """(the shape [E, d_in, d_out] of every expert stack, the number of non-expert params) of `config`."""
    import math

    from pregated_jax.model import is_expert_param, param_shapes

    shapes = param_shapes(config)  # an abstract model: seconds for the large presets, so once per config
    return ([s for p, s in shapes.items() if is_expert_param(p)],
            sum(math.prod(s) for p, s in shapes.items() if not is_expert_param(p)))


def expert_bytes(config, fmt: str, group_size: int, stacks=None) -> int:
    """Bytes of all expert stacks of `config` in format `fmt` (values + scales), from shapes only
    (`quant.expert_nbytes`); `stacks`: their shapes, when already known."""
    from pregated_jax.quant import expert_nbytes

    per: dict[tuple[int, int], int] = {}
    total = 0
    for e, d_in, d_out in stacks if stacks is not None else _shapes(config)[0]:
        if (d_in, d_out) not in per:
            per[(d_in, d_out)] = expert_nbytes(d_in, d_out, fmt, group_size)
        total += e * per[(d_in, d_out)]
    return total


def store_bytes_table(presets=TABLE_PRESETS, formats=("bfloat16", "int8", "float8_e4m3fn", "int4"),
                      group_size: int = 128) -> list[dict]:
    """One row per (preset, format): expert bytes, their ratio to bfloat16, and the float32 non-expert bytes a
    store or a loaded checkpoint holds beside them. Presets that do not exist are skipped."""
    from pregated_jax.config import PRESETS

    rows = []
    for name in presets:
        if name not in PRESETS:
            continue
        config = PRESETS[name]
        stacks, non_expert = _shapes(config)
        bf16 = expert_bytes(config, "bfloat16", group_size, stacks)
        params = sum(e * d_in * d_out for e, d_in, d_out in stacks)
        for fmt in formats:
            b = expert_bytes(config, fmt, group_size, stacks)
            rows.append({"preset": name, "format": fmt, "group_size": group_size if fmt == "int4" else None,
                         "expert_params": params, "expert_bytes": b, "ratio_to_bfloat16": b / bf16,
                         "non_expert_float32_bytes": 4 * non_expert})
    return rows


# --- writing the checkpoints --------------------------------------------------------------------------

def write_bf16_checkpoint(config, path, seed: int = 0) -> Path:
    """A Hugging Face checkpoint (config.json + model.safetensors, every tensor bfloat16, the names and layout of
    `hf_checkpoint.save_pretrained`) of `random_model(config)`, streamed one tensor at a time: host memory holds
    the bf16 model plus one tensor, where `save_pretrained` builds float32 copies of everything first (too much
    for a few-GB model on a small machine). The tiny-preset test checks it loads as `save_pretrained`'s does."""
    import ml_dtypes
    import numpy as np
    from flax import nnx

    from pregated_jax.bench.random_model import random_model
    from pregated_jax.hf_checkpoint import SAFETENSORS, hf_layout

    model = random_model(config.replace(dtype="bfloat16"), seed, experts_on_host=True)
    values = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    entries = []  # (name, shape, getter)
    for p, (kind, names) in hf_layout(config).items():
        v = values[p]
        if kind == "experts":
            e, d_in, d_out = v.get_value().shape
            entries += [(n, (d_out, d_in), lambda v=v, k=k: np.asarray(v.get_value()[k]).T) for k, n in enumerate(names)]
        else:
            shape = tuple(v.get_value().shape)
            entries.append((names[0], shape[::-1] if kind == "T" else shape,
                            lambda v=v, t=(kind == "T"): np.asarray(v.get_value()).T if t else np.asarray(v.get_value())))
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, _ in entries:
        n = 2 * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    target = Path(path)
    target.mkdir(parents=True, exist_ok=True)
    (target / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2, sort_keys=True) + "\n")
    with open(target / SAFETENSORS, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for _, _, get in entries:
            f.write(np.ascontiguousarray(get().astype(ml_dtypes.bfloat16)).tobytes())
    return target


# --- subprocess workers -------------------------------------------------------------------------------

def _rss() -> dict:
    """RSS of this process now, from /proc/self/status (bytes): total, anonymous, file-backed; peak (HWM)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def _child(mode: str, args: list[str]) -> dict:
    """Runs in a fresh process: "baseline", "load PATH", "write PRESET SEED DIR", "quantize CKPT FMT GROUP OUT"."""
    t0 = time.perf_counter()
    import jax
    import jax.numpy as jnp

    import pregated_jax  # noqa: F401  (the runtime the loads pay for too)

    out: dict = {"mode": mode, "args": args}
    if mode == "baseline":
        jnp.ones((8,)).block_until_ready()
    elif mode == "load":
        from flax import nnx

        from pregated_jax.loading import load_model
        from pregated_jax.model import is_expert_param

        t = time.perf_counter()
        model = load_model(args[0], dtype="bfloat16", experts_on="host")  # as infer.py --dtype bfloat16 serves
        out["load_s"] = time.perf_counter() - t
        experts, others, kinds, dtypes = 0, 0, set(), set()
        for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            leaves = jax.tree.leaves(var.get_value())
            n = sum(int(leaf.nbytes) for leaf in leaves)
            if is_expert_param(p):
                experts += n
                kinds |= {leaf.sharding.memory_kind for leaf in leaves}
                dtypes |= {str(leaf.dtype) for leaf in leaves}
            else:
                others += n
        out.update(expert_bytes=experts, non_expert_bytes=others, expert_memory_kinds=sorted(kinds),
                   expert_leaf_dtypes=sorted(dtypes))
    elif mode == "write":
        from pregated_jax.config import get_preset

        write_bf16_checkpoint(get_preset(args[0]), args[2], int(args[1]))
    elif mode == "quantize":
        from pregated_jax.cli.quantize import main  # scripts/quantize.py

        main(["--checkpoint", args[0], "--expert_dtype", args[1], "--expert_group_size", args[2], "--out", args[3]])
    else:
        raise ValueError(f"unknown mode {mode!r}")
    out.update(_rss(), ru_maxrss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
               seconds=time.perf_counter() - t0, backend=jax.default_backend())
    return out


def run_child(mode: str, *args: str) -> dict:
    """`_child(mode, args)` in a fresh Python process; its result (the last stdout line, JSON)."""
    cmd = [sys.executable, "-m", "pregated_jax.bench.store_memory", mode, *map(str, args)]
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


def measure(preset: str, formats=("int8", "int4"), group_size: int = 128, workdir="/tmp/store-mem/work",
            seed: int = 0, keep: bool = False, log=print) -> dict:
    """Writes the bf16 checkpoint and the stores of `preset` under `workdir`, then loads each in a fresh
    process (and a baseline process); -> every number, per format ("bfloat16" is the HF checkpoint)."""
    import shutil

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / f"{preset}-bf16"
    out: dict = {"preset": preset, "group_size": group_size, "seed": seed, "workdir": str(work), "steps": {}}
    log(f"writing {ckpt} ...")
    out["steps"]["write_bf16"] = run_child("write", preset, seed, ckpt)
    paths = {"bfloat16": ckpt}
    for fmt in formats:
        paths[fmt] = work / f"{preset}-{fmt}"
        log(f"quantizing to {paths[fmt]} (scripts/quantize.py) ...")
        out["steps"][f"quantize_{fmt}"] = run_child("quantize", ckpt, fmt, group_size, paths[fmt])
    log("baseline process ...")
    base = out["baseline"] = run_child("baseline")
    table = {r["format"]: r["expert_bytes"] for r in store_bytes_table([preset], list(paths), group_size)}
    out["loads"] = {}
    for fmt, path in paths.items():
        log(f"loading {path} with experts_on='host' ...")
        r = run_child("load", path)
        r.update(format=fmt, path=str(path), disk_bytes=_dir_bytes(path), expected_expert_bytes=table[fmt],
                 peak_minus_baseline=r["ru_maxrss_bytes"] - base["ru_maxrss_bytes"],
                 rss_minus_baseline=r["VmRSS"] - base["VmRSS"])
        out["loads"][fmt] = r
    bf16 = table["bfloat16"]
    ref = out["loads"]["bfloat16"]["peak_minus_baseline"]
    for fmt, r in out["loads"].items():  # peak - baseline can be <= 0 for a tiny model: ratios then None
        r["expert_bytes_over_bf16_bytes"] = r["expert_bytes"] / bf16
        r["peak_minus_baseline_over_expert_bytes"] = r["peak_minus_baseline"] / r["expert_bytes"]
        r["peak_minus_baseline_over_bf16_checkpoint"] = r["peak_minus_baseline"] / ref if ref > 0 else None
    if not keep:
        for path in paths.values():
            shutil.rmtree(path, ignore_errors=True)
    return out


def markdown(result: dict) -> str:
    """The measured part as a README-ready markdown table (MB = 1e6 bytes)."""
    base = result["baseline"]
    def ratio(x):
        return "n/a" if x is None else f"{x:.3f}"

    lines = [f"{result['preset']}: baseline process (import jax + pregated_jax, one array) peak RSS "
             f"{base['ru_maxrss_bytes'] / MB:.0f} MB, RSS {base['VmRSS'] / MB:.0f} MB. "
             f"Loads: `pj.load_model(path, experts_on=\"host\")` in a fresh process.", "",
             "| checkpoint | on disk MB | expert bytes held MB (dtype) | / bf16 expert bytes | non-expert MB "
             "| RSS after load - base MB (anon / file) | peak RSS - base MB | peak - base / expert bytes "
             "| peak - base / bf16 ckpt's | load s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for fmt, r in result["loads"].items():
        name = "bf16 HF checkpoint" if fmt == "bfloat16" else f"{fmt} store"
        lines.append(
            f"| {name} | {r['disk_bytes'] / MB:.0f} | {r['expert_bytes'] / MB:.0f} ({'/'.join(r['expert_leaf_dtypes'])}) "
            f"| {r['expert_bytes_over_bf16_bytes']:.3f} | {r['non_expert_bytes'] / MB:.0f} "
            f"| {r['rss_minus_baseline'] / MB:.0f} ({(r['RssAnon'] - base['RssAnon']) / MB:.0f} / "
            f"{(r['RssFile'] - base['RssFile']) / MB:.0f}) | {r['peak_minus_baseline'] / MB:.0f} "
            f"| {r['peak_minus_baseline_over_expert_bytes']:.2f} | {ratio(r['peak_minus_baseline_over_bf16_checkpoint'])} "
            f"| {r['load_s']:.1f} |")
    return "\n".join(lines)


def table_markdown(rows: list[dict]) -> str:
    """`store_bytes_table` rows as a markdown table (GB = 1e9 bytes)."""
    lines = ["| preset | format | expert GB | / bfloat16 | non-expert fp32 GB |", "|---|---|---|---|---|"]
    for r in rows:
        fmt = r["format"] + (f" (g{r['group_size']})" if r["group_size"] else "")
        lines.append(f"| {r['preset']} | {fmt} | {r['expert_bytes'] / 1e9:.3f} | {r['ratio_to_bfloat16']:.4f} "
                     f"| {r['non_expert_float32_bytes'] / 1e9:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(_child(sys.argv[1], sys.argv[2:])))
