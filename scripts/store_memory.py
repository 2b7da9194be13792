"""Host memory of a bf16 checkpoint vs quantized expert stores: shape-only byte table and measured peak RSS.

    python scripts/store_memory.py --preset switch-base-16 --formats int8,int4 --out /tmp/store-mem/out

Prints the exact expert bytes of each preset in each format (shapes only: switch-base-*, switch-large-128,
switch-xxl-128), then, for --preset, writes a bf16 Hugging Face checkpoint of a random model and quantized stores
of it (scripts/quantize.py's code path) under --workdir, loads each with `pj.load_model(path, experts_on="host")`
in a fresh process and reports its peak RSS (ru_maxrss) minus a baseline process's (import jax + pregated_jax)
against the expert bytes it holds (`pregated_jax.bench.store_memory`). Writes OUT/results.json with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="switch-base-16", help="the measured model (writing its int8/int4 stores "
                                                               "reads the checkpoint in float32: ~4x its bf16 "
                                                               "expert bytes of RAM)")
    p.add_argument("--formats", default="int8,int4", help="comma-separated quantized formats to write and load")
    p.add_argument("--group_size", type=int, default=128, help="int4 group size")
    p.add_argument("--table_presets", default=",".join(
        ("switch-base-8", "switch-base-16", "switch-base-32", "switch-base-64", "switch-base-128",
         "switch-large-128", "switch-xxl-128")), help="presets of the shape-only byte table")
    p.add_argument("--workdir", default="/tmp/store-mem/work", help="where the checkpoint and stores are written")
    p.add_argument("--keep", action="store_true", help="keep the written checkpoint and stores")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip_measure", action="store_true", help="only the shape-only table")
    p.add_argument("--out", default=None, help="folder for results.json (default: print only)")
    args = p.parse_args(argv)
    from pregated_jax.quant import FORMATS

    bad = set(args.formats.split(",")) - set(FORMATS) | ({"bfloat16"} & set(args.formats.split(",")))
    if bad:
        p.error(f"--formats: {sorted(bad)} are not quantized formats; use {', '.join(FORMATS[1:])}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import jax

    from pregated_jax.bench import store_memory as sm

    start = time.perf_counter()
    rows = sm.store_bytes_table(args.table_presets.split(","), group_size=args.group_size)
    print(sm.table_markdown(rows))
    report = {
        "command": "python scripts/store_memory.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "backend": jax.default_backend(), "device": str(jax.devices()[0]), "jax": jax.__version__,
        "python": platform.python_version(),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
                    "mem_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")},
        "byte_table": rows,
    }
    try:
        import flax
        import qwix  # noqa: F401
        report["versions"] = {"flax": flax.__version__, "jaxlib": __import__("jaxlib").__version__,
                              "numpy": __import__("numpy").__version__}
    except Exception:  # noqa: BLE001 - versions are informative only
        pass
    if not args.skip_measure:
        report["measured"] = sm.measure(args.preset, args.formats.split(","), args.group_size, args.workdir,
                                        args.seed, args.keep, log=lambda m: print(m, file=sys.stderr, flush=True))
        print()
        print(sm.markdown(report["measured"]))
    report["seconds"] = time.perf_counter() - start
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
