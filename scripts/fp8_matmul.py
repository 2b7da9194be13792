"""Expert grouped matmul on Hopper: float8_e4m3fn weights consumed natively vs dequantized to bfloat16 first.

    python scripts/fp8_matmul.py --tiny --repeats 2                        # CPU smoke run
    python scripts/fp8_matmul.py --repeats 50 --warmup 5 --out docs/benchmarks/fp8-matmul-h200

Times y[T, d_out] = x[T, d_in] @ w[group(t)] (`jax.lax.ragged_dot`) as "bf16", "fp8-dequant" (the engine's
path today) and "fp8-native" (per-token fp8 activations x fp8 weights, float32 accumulation) for
switch-base-128 and switch-large-128's wi and wo shapes at decode- and prefill-like token counts; see
`pregated_jax/bench/fp8_matmul.py`. Prints a markdown table; --out writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=50, help="timed calls per variant and case (median reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls first (the first compiles)")
    p.add_argument("--tiny", action="store_true", help="small shapes, for a CPU smoke run")
    p.add_argument("--out", default=None, help="folder for results.json (default: print only)")
    args = p.parse_args(argv)
    for name in ("repeats", "warmup"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import jax

    from pregated_jax.bench import fp8_matmul

    device = jax.devices()[0]
    report = {
        "command": "python scripts/fp8_matmul.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "jax_version": jax.__version__, "device": str(device), "device_kind": device.device_kind,
        "platform": device.platform, "backend": jax.default_backend(),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count()},
        "repeats": args.repeats, "warmup": args.warmup, "cases": [],
    }
    cases = fp8_matmul.default_cases(tiny=args.tiny)

    def progress(rows):  # one line per finished case; results.json holds the cases so far
        print(f"[{len(rows)}/{len(cases)}] " + fp8_matmul.markdown_table(rows[-1:]).splitlines()[-1], flush=True)
        report["cases"] = rows
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "results.json").write_text(json.dumps(report, indent=1) + "\n")

    rows = fp8_matmul.run_cases(cases, args.repeats, args.warmup, on_case=progress)
    print(f"\n{device.device_kind} ({device.platform}), jax {jax.__version__}, median of {args.repeats} calls\n")
    print(fp8_matmul.markdown_table(rows))
    errors = {(r.get("model"), r.get("matmul"), r.get("regime"), r["tokens"], name): v["error"]
              for r in rows for name, v in r["variants"].items() if "error" in v}
    for key, message in errors.items():
        print(f"error {key}: {message}")
    return report


if __name__ == "__main__":
    main()
