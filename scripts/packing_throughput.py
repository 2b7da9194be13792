"""Useful (non-pad) training tokens/s and pad fraction without and with example packing (grain pipeline).

    python scripts/packing_throughput.py --steps 20 --batch_size 8 --out docs/benchmarks/packing-cpu
    python scripts/packing_throughput.py --gin_file configs/debian_small.gin --steps 200 --batch_size 64 \
        --out docs/benchmarks/packing-gpu

Trains `--warmup + --steps` steps per mode with `train_and_evaluate` on the task's default input
(`DataConfig.pack` off, then on; everything else equal) and times the steps after the warmup (compile) up to
the one before the last (the last one saves a checkpoint and evaluates). Useful tokens are the real input plus
target tokens of each batch (`attention_mask` + `decoder_attention_mask`), so the time includes reading,
tokenizing and packing. Writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

import numpy as np  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gin_file", default="configs/tiny.gin", help="training config (model, task); default tiny")
    p.add_argument("--gin", action="append", default=[], metavar="NAME=VALUE", help="extra gin bindings")
    p.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_input_len", type=int, default=256)
    p.add_argument("--max_target_len", type=int, default=32)
    p.add_argument("--packing_bins", type=int, default=None, help="DataConfig.packing_bins (default: batch_size)")
    p.add_argument("--worker_count", type=int, default=0,
                   help="DataConfig.worker_count: processes making batches ahead (0: in the training process)")
    p.add_argument("--modes", default="unpacked,packed", help="comma-separated: unpacked, packed")
    p.add_argument("--out", default=None, help="folder for results.json (default: print only)")
    args = p.parse_args(argv)
    for name in ("steps", "warmup", "batch_size", "max_input_len", "max_target_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.worker_count < 0:
        p.error(f"--worker_count must be >= 0, got {args.worker_count}")
    bad = set(args.modes.split(",")) - {"unpacked", "packed"}
    if bad:
        p.error(f"--modes: unknown {sorted(bad)}; use unpacked, packed")
    return args


def measure(config, pack: bool, steps: int, warmup: int) -> dict:
    """Trains warmup + steps + 1 steps; -> throughput and padding of the timed steps."""
    from pregated_jax.train import train_and_evaluate
    from pregated_jax.train.inputs import default_batches

    t = config.training
    total = warmup + steps + 1
    config = config.replace(
        training=dataclasses.replace(t, num_steps=total, checkpoint_every=total, eval_every=total, eval_steps=1,
                                     log_every=total, tensorboard=False, async_checkpointing=False),
        data=dataclasses.replace(config.data, pack=pack))
    train, evals = default_batches(config)
    per_step: list[dict] = []

    def counted():
        for batch in train:
            examples = (int(batch["encoder_segment_ids"].max(axis=1).sum()) if "encoder_segment_ids" in batch
                        else int((batch["attention_mask"].sum(axis=1) > 0).sum()))
            per_step.append({"input_tokens": int(batch["attention_mask"].sum()),
                             "target_tokens": int(batch["decoder_attention_mask"].sum()), "examples": examples,
                             "input_slots": batch["input_ids"].size, "target_slots": batch["labels"].size})
            yield batch

    times: dict[int, float] = {}
    workdir = tempfile.mkdtemp(prefix="packing-throughput-")
    try:
        train_and_evaluate(config, workdir, counted(), evals,
                           step_callback=lambda step, _: times.__setitem__(step, time.perf_counter()))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    timed = per_step[warmup:warmup + steps]  # the batches of steps warmup+1 .. warmup+steps
    seconds = times[warmup + steps] - times[warmup]
    tokens = sum(s["input_tokens"] + s["target_tokens"] for s in timed)
    slots = sum(s["input_slots"] + s["target_slots"] for s in timed)
    return {
        "pack": pack, "timed_steps": steps, "seconds": seconds,
        "useful_tokens_per_s": tokens / seconds,
        "useful_target_tokens_per_s": sum(s["target_tokens"] for s in timed) / seconds,
        "examples_per_s": sum(s["examples"] for s in timed) / seconds,
        "steps_per_s": steps / seconds,
        "examples_per_batch": float(np.mean([s["examples"] for s in timed])),
        "pad_fraction": 1 - tokens / slots,
        "input_pad_fraction": 1 - sum(s["input_tokens"] for s in timed) / sum(s["input_slots"] for s in timed),
        "target_pad_fraction": 1 - sum(s["target_tokens"] for s in timed) / sum(s["target_slots"] for s in timed),
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    import jax

    from pregated_jax.train import config_from_gin

    bindings = [f"TrainingConfig.batch_size = {args.batch_size}",
                f"TrainingConfig.max_input_len = {args.max_input_len}",
                f"TrainingConfig.max_target_len = {args.max_target_len}",
                f"DataConfig.packing_bins = {args.packing_bins}", f"DataConfig.worker_count = {args.worker_count}",
                *args.gin]
    config, _ = config_from_gin([args.gin_file], bindings)
    results = {mode: measure(config, mode == "packed", args.steps, args.warmup) for mode in args.modes.split(",")}
    if {"packed", "unpacked"} <= set(results):
        results["packed_over_unpacked_useful_tokens_per_s"] = (results["packed"]["useful_tokens_per_s"]
                                                               / results["unpacked"]["useful_tokens_per_s"])
    report = {
        "command": "python scripts/packing_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": str(jax.devices()[0]), "device_kind": jax.devices()[0].device_kind,
        "backend": jax.default_backend(), "jax": jax.__version__,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count()},
        "task": config.data.task, "model": dataclasses.asdict(config.model_config()),
        "batch_size": args.batch_size, "max_input_len": args.max_input_len, "max_target_len": args.max_target_len,
        "packing_bins": args.packing_bins or args.batch_size, "worker_count": config.data.worker_count,
        "warmup_steps": args.warmup,
        "results": results,
    }
    print(json.dumps(report["results"], indent=1))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
