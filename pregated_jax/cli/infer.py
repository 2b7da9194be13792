"""Generate with the offload inference engine: the project's main job.

Runs as `pregated-infer`, `python -m pregated_jax.infer` or `python scripts/infer.py`.

    python scripts/infer.py                                  # built-in default model, demo inputs
    python scripts/infer.py --text "summarize: ..." --mode on-demand --num_beams 4
    python scripts/infer.py --mode pregated --cache_policy lru --cache_experts 4 --guess_first_block off
    python scripts/infer.py --checkpoint path/to/hf_or_orbax_dir --file inputs.txt --json out.json
    echo "summarize: ..." | python scripts/infer.py --checkpoint ...

Inputs come from --text (repeatable), --file (one per line), or standard input; with none of these, a few
held-out Debian package descriptions. Blank input (a whitespace --text, or a file or standard input with no
non-blank line) is an error, exit code 2, and so is a --json path whose folder is missing (checked before
anything runs); a --checkpoint that does not exist or holds no model exits with one error line. Prints each
output, then the run statistics (prefill latency, tokens/s, per-MoE-block latency with --profile, bytes moved
host->device, GB/s, peak device memory, cache and speculative hit rates). Every `EngineConfig` field has a flag of its name (see --help;
`device_budget_bytes` is given in GiB as --device_budget_gib).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pregated_jax.cli import HelpFormatter


def parse_args(argv=None):
    from pregated_jax.engine_cli import add_engine_flags, add_mesh_flag, add_process_flags

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", default="default",
                   help="'default' (built-in model), a Hugging Face directory, a T5X checkpoint, "
                        "or an Orbax checkpoint of ours")
    p.add_argument("--text", action="append", default=[], help="an input text (repeatable)")
    p.add_argument("--file", help="a file with one input per line")
    p.add_argument("--num_beams", type=int, default=1, help="beam width (1: greedy)")
    p.add_argument("--max_new_tokens", type=int, default=32, help="tokens generated per input")
    p.add_argument("--max_input_len", type=int, default=512, help="longer inputs are truncated")
    p.add_argument("--batch_size", type=int, default=8, help="inputs per engine call")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype (default: the checkpoint's)")
    p.add_argument("--profile", action="store_true", help="also time every MoE block (a synchronized pass)")
    p.add_argument("--warmup", action="store_true", help="compile with a first, untimed run of each batch")
    p.add_argument("--json", help="write outputs and statistics here")
    p.add_argument("--save_trace", help="record the routing (--record_routing on) and write it here as a routing "
                   "trace for plan_placement.py --trace")
    add_process_flags(p)
    add_mesh_flag(p)
    add_engine_flags(p, mode=None)
    args = p.parse_args(argv)
    for name in ("num_beams", "max_new_tokens", "max_input_len", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    for flag in ("json", "save_trace"):  # checked before the model loads and generates, not when written
        if getattr(args, flag) is None:
            continue
        out = Path(getattr(args, flag))
        if out.is_dir():
            p.error(f"--{flag} {out} is a directory; give a file path")
        if not out.parent.is_dir():
            p.error(f"--{flag} {out}: folder {out.parent} does not exist")
        if not os.access(out.parent, os.W_OK):
            p.error(f"--{flag} {out}: folder {out.parent} is not writable")
    return args


def read_inputs(args) -> list[str]:
    """The user's inputs; the demo inputs only where none was given. Blank input is an error (exit 2)."""
    for i, text in enumerate(args.text, 1):
        if not text.strip():
            _usage_error(f"--text number {i} is empty or only whitespace: nothing to generate from")
    texts = list(args.text)
    if args.file:
        path = Path(args.file)
        if not path.exists():
            _usage_error(f"--file {path} does not exist")
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not lines:
            _usage_error(f"--file {path} has no non-blank line: nothing to generate from")
        texts += lines
    if not args.text and not args.file and not sys.stdin.isatty():
        data = sys.stdin.read()
        texts = [line.strip() for line in data.splitlines() if line.strip()]
        if data and not texts:  # empty standard input (e.g. /dev/null) still means "no input given"
            _usage_error("standard input has no non-blank line: nothing to generate from")
    if not texts:  # demo inputs: held-out Debian descriptions
        from pregated_jax.data import debian_source

        texts = [ex["inputs"] for _, ex in zip(range(4), debian_source("validation"))]
    return texts


def _usage_error(message: str):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv=None):
    args = parse_args(argv)
    from pregated_jax.engine_cli import engine_config_from_args, mesh_from_args, prepare_process
    prepare_process(args)  # before the first JAX computation
    import numpy as np
    from tqdm import tqdm

    from pregated_jax.data.tokenizer import Tokenizer
    from pregated_jax.engine import InferenceEngine
    from pregated_jax.loading import load_model, vocabulary_for

    texts = read_inputs(args)
    try:
        mesh = mesh_from_args(args)
    except ValueError as e:  # a malformed --mesh, or more devices than there are
        raise SystemExit(f"error: {e}") from None
    print(f"loading {args.checkpoint} ...", file=sys.stderr)
    try:
        # offload modes keep the experts in host memory: load them straight there, never onto the device
        experts_on = "device" if args.mode == "gpu-only" else "host"
        model = load_model(args.checkpoint, dtype=args.dtype, experts_on=experts_on)
    except (FileNotFoundError, ValueError) as e:  # no such path, no model there, a bad file (named)
        raise SystemExit(f"error: {e}") from None
    cfg = model.config
    try:
        config = engine_config_from_args(args, routing=cfg.routing,
                                         record_routing=args.record_routing or args.save_trace is not None)
        engine = InferenceEngine(model, config, mesh=mesh)
    except ValueError as e:  # a mode that does not fit the model, a cache without a size, experts that do not split
        raise SystemExit(f"error: {e}") from None
    del model
    tok = Tokenizer(vocabulary_for(args.checkpoint))
    print(f"{cfg.num_experts} experts x {len(cfg.sparse_blocks('encoder')) + len(cfg.sparse_blocks('decoder'))} "
          f"MoE blocks, routing {cfg.routing}, engine mode {engine.config.mode}, {len(texts)} input(s)",
          file=sys.stderr)

    results, all_stats = [], []
    batches = range(0, len(texts), args.batch_size)
    for start in tqdm(batches, desc="batches", disable=len(batches) < 2, file=sys.stderr):
        chunk = texts[start:start + args.batch_size]
        ids = [tok.encode(t) for t in chunk]
        ids = [x if len(x) <= args.max_input_len else x[:args.max_input_len - 1] + [cfg.eos_token_id] for x in ids]
        width = max(map(len, ids))
        input_ids = np.array([x + [cfg.pad_token_id] * (width - len(x)) for x in ids], np.int32)
        mask = np.array([[1] * len(x) + [0] * (width - len(x)) for x in ids], np.int32)
        bar = tqdm(total=args.max_new_tokens, desc="decode", leave=False, file=sys.stderr,
                   disable=args.max_new_tokens < 64)
        try:  # a request refused before it runs: one that needs more memory than is free, an empty mask row
            if args.warmup:
                engine.generate(input_ids, mask, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
            res = engine.generate(input_ids, mask, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                                  progress=lambda t, total: bar.update(1))
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        bar.close()
        if args.profile:
            res.stats.moe_block_s = engine.generate(input_ids, mask, max_new_tokens=args.max_new_tokens,
                                                    num_beams=args.num_beams, profile_blocks=True).stats.moe_block_s
        all_stats.append(res.stats)
        for text, out in zip(chunk, tok.decode_batch(res.tokens.tolist())):
            results.append({"input": text, "output": out})
            print(f"\n> {text[:200]}{'...' if len(text) > 200 else ''}\n< {out}")
    print("\n" + "\n\n".join(s.table() for s in all_stats))
    if not args.warmup:
        print("(timings include JIT compilation; --warmup excludes it)")
    if args.save_trace:
        trace = None
        for s in all_stats:
            trace = s.routing_trace(cfg, trace, checkpoint=str(args.checkpoint), source="infer")
        trace.save(args.save_trace)
        print(f"wrote the routing trace ({trace.steps} steps) to {args.save_trace}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "stats": [s.as_dict() for s in all_stats]},
                                              indent=1))
    return results


if __name__ == "__main__":
    main()
