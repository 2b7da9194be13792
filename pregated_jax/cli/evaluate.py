"""Evaluate a checkpoint on a task with the offload inference engine: ROUGE (summarization) or EM/F1 (QA).

Runs as `pregated-evaluate`, `python -m pregated_jax.evaluate` or `python scripts/evaluate.py`.

    python scripts/evaluate.py --checkpoint default --task debian --max_examples 200 --workdir runs/eval
    python scripts/evaluate.py --checkpoint ckpt/ --task squad --mode pregated --num_beams 4 --workdir W
    python scripts/evaluate.py --checkpoint default --task debian --batch_size 4 --cache_policy lru \
        --cache_experts 4 --workdir W
    python scripts/evaluate.py --checkpoint ckpt/ --data_file my.jsonl --input_field question \\
        --target_field answer --metric qa --workdir W

Writes W/predictions.jsonl (one {"input", "target", "prediction"[, "answers"]} per line) and W/scores.json
(metrics, settings, aggregated engine statistics), each written to a temporary file and then renamed, and
prints the scores. The engine takes a flag per `EngineConfig` field, as scripts/infer.py does (see --help);
in every mode but gpu-only the experts are loaded straight into host memory. A request the memory check
refuses (`pregated_jax.memory`: more memory than is free) exits with one `error:` line, before it runs.
TFDS tasks (xsum, squad, web_questions) need the data prepared first (`tfds build ...`,
see pregated_jax/data/sources.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

from pregated_jax.cli import HelpFormatter


TASK_NAMES = ("debian", "xsum", "squad", "web_questions")


def parse_args(argv=None):
    from pregated_jax.engine_cli import add_engine_flags, add_mesh_flag, add_process_flags

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", default="default",
                   help="'default' (built-in model), a Hugging Face directory, a T5X checkpoint, "
                        "or an Orbax checkpoint of ours")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", choices=TASK_NAMES, help="a registered task")
    src.add_argument("--data_file", help="a local .jsonl/.jsonl.gz/.tsv task file (with --input_field, "
                     "--target_field, --metric)")
    p.add_argument("--input_field", default="inputs", help="--data_file: the field holding the input text")
    p.add_argument("--target_field", default="targets", help="--data_file: the field holding the target text")
    p.add_argument("--input_prefix", default="", help="--data_file: prepended to every input (e.g. 'summarize: ')")
    p.add_argument("--metric", choices=("rouge", "qa"),
                   help="scoring (default: the task's; 'rouge' for --data_file)")
    p.add_argument("--split", help="the task's split (default: its evaluation split)")
    p.add_argument("--data_dir", help="TFDS data directory (default ~/tensorflow_datasets)")
    p.add_argument("--max_examples", type=int, help="evaluate the first N examples only")
    p.add_argument("--num_beams", type=int, default=1, help="beam width (1: greedy)")
    p.add_argument("--batch_size", type=int, default=8, help="inputs per engine call")
    p.add_argument("--max_new_tokens", type=int, default=32, help="tokens generated per input")
    p.add_argument("--max_input_len", type=int, default=512, help="longer inputs are truncated")
    p.add_argument("--pad_to_multiple", type=int, default=32,
                   help="round batch widths up to this multiple so batches share compiled shapes")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype (default: the checkpoint's)")
    p.add_argument("--workdir", required=True, help="where predictions.jsonl and scores.json go")
    add_process_flags(p)
    add_mesh_flag(p)
    add_engine_flags(p, mode=None)
    args = p.parse_args(argv)
    if args.data_file is None and (args.input_field != "inputs" or args.target_field != "targets"
                                   or args.input_prefix):
        p.error("--input_field/--target_field/--input_prefix apply only with --data_file")
    for name in ("num_beams", "batch_size", "max_new_tokens", "max_input_len", "pad_to_multiple"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.max_examples is not None and args.max_examples < 0:
        p.error("--max_examples must be >= 0")
    return args


def write_atomic(path: Path, text: str):
    """Writes text to a temporary file next to `path`, then renames it over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_task(args):
    """(examples, metric, split, task label) with data errors turned into one-line exits."""
    from pregated_jax.data import MissingFieldError, local_source
    from pregated_jax.evaluation import load_examples

    try:
        if args.data_file:
            source = local_source(args.data_file, args.input_field, args.target_field, prefix=args.input_prefix)
            examples, _, _ = load_examples(source, max_examples=args.max_examples)
            return examples, args.metric or "rouge", None, args.data_file
        examples, metric, split = load_examples(args.task, args.split, args.max_examples, args.data_dir)
        return examples, args.metric or metric, split, args.task
    except (FileNotFoundError, ValueError, MissingFieldError, ImportError) as e:
        raise SystemExit(f"error: {e}") from None


def main(argv=None) -> dict:
    args = parse_args(argv)
    from pregated_jax.engine_cli import engine_config_from_args, mesh_from_args, prepare_process
    prepare_process(args)  # before the first JAX computation
    from pregated_jax.engine import InferenceEngine
    from pregated_jax.evaluation import evaluate
    from pregated_jax.loading import load_model, vocabulary_for

    workdir = Path(args.workdir)
    if args.checkpoint != "default" and not Path(args.checkpoint).exists():  # before reading any data
        raise SystemExit(f"error: checkpoint path {args.checkpoint} does not exist")
    try:
        mesh = mesh_from_args(args)
    except ValueError as e:  # a malformed --mesh, or more devices than there are
        raise SystemExit(f"error: {e}") from None
    examples, metric, split, label = read_task(args)
    if not examples:
        raise SystemExit(f"error: no examples to evaluate in {label}" + (f" split {split!r}" if split else ""))
    print(f"loading {args.checkpoint} ...", file=sys.stderr)
    try:
        # offload modes keep the experts in host memory: load them straight there, never onto the device
        experts_on = "device" if args.mode == "gpu-only" else "host"
        model = load_model(args.checkpoint, dtype=args.dtype, experts_on=experts_on)
    except (FileNotFoundError, ValueError) as e:  # no model there, a bad file (named)
        raise SystemExit(f"error: {e}") from None
    try:
        engine = InferenceEngine(model, engine_config_from_args(args, routing=model.config.routing), mesh=mesh)
    except ValueError as e:  # a mode that does not fit the model, a cache without a size
        raise SystemExit(f"error: {e}") from None
    del model
    print(f"{label}{f' ({split})' if split else ''}: {len(examples)} examples, metric {metric}, "
          f"engine mode {engine.config.mode}", file=sys.stderr)
    try:  # a request refused before it runs: one that needs more memory than is free (`pregated_jax.memory`)
        result = evaluate(engine, examples, split, metric=metric, batch_size=args.batch_size,
                          max_input_len=args.max_input_len, max_new_tokens=args.max_new_tokens,
                          num_beams=args.num_beams, tokenizer=vocabulary_for(args.checkpoint),
                          pad_to_multiple=args.pad_to_multiple)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    result["split"] = split

    workdir.mkdir(parents=True, exist_ok=True)
    write_atomic(workdir / "predictions.jsonl",
                 "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in result["predictions"]))
    scores = {
        "checkpoint": str(args.checkpoint), "task": args.task, "data_file": args.data_file, "split": split,
        "metric": metric, "metrics": result["metrics"], "num_examples": result["num_examples"],
        "settings": {"mode": engine.config.mode,
                     **{k: getattr(args, k) for k in ("num_beams", "batch_size", "max_new_tokens", "max_input_len",
                                                      "max_examples", "dtype", "mesh")},
                     "engine": dataclasses.asdict(engine.config)},
        "stats": result["stats"],
    }
    write_atomic(workdir / "scores.json", json.dumps(scores, indent=1) + "\n")

    print(f"\n{label}{f' ({split})' if split else ''}, {result['num_examples']} examples:")
    for k, v in result["metrics"].items():
        print(f"  {k:12s} {v:7.2f}")
    s = result["stats"]
    rate = f"{s['tokens_per_s']:.1f} tok/s" if s["tokens_per_s"] else "-"
    print(f"  {s['new_tokens']} new tokens in {s['total_s']:.1f} s ({rate}, incl. compilation), mode {s['mode']}")
    print(f"wrote {workdir / 'predictions.jsonl'} and {workdir / 'scores.json'}")
    return scores


if __name__ == "__main__":
    main()
