"""Generate with the offload inference engine: the project's main job.

    python scripts/infer.py                                  # built-in default model, demo inputs
    python scripts/infer.py --text "summarize: ..." --mode on-demand --num_beams 4
    python scripts/infer.py --checkpoint path/to/hf_or_orbax_dir --file inputs.txt --json out.json
    echo "summarize: ..." | python scripts/infer.py --checkpoint ...

Inputs come from --text (repeatable), --file (one per line), or standard input; with none of these, a few
held-out Debian package descriptions. Prints each output, then the run statistics (prefill latency,
tokens/s, per-MoE-block latency with --profile, bytes moved host->device, GB/s, peak device memory,
cache and speculative hit rates).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout


def parse_args(argv=None):
    from pregated_jax.engine import MODES, EngineConfig
    from pregated_jax.engine.fetch import POLICIES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="default",
                   help="'default' (built-in model), a Hugging Face directory, or an Orbax checkpoint of ours")
    p.add_argument("--text", action="append", default=[], help="an input text (repeatable)")
    p.add_argument("--file", help="a file with one input per line")
    p.add_argument("--mode", choices=MODES, help="engine mode (default: pregated for pre-gated models, "
                   "speculative for conventional ones)")
    p.add_argument("--num_beams", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--max_input_len", type=int, default=512, help="longer inputs are truncated")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--cache", choices=POLICIES, help="device expert cache policy (default: no cache)")
    p.add_argument("--cache_experts", type=int, help="cache slots per MoE block")
    p.add_argument("--device_budget_gib", type=float, help="bound for the engine's expert buffers")
    p.add_argument("--decode_steps_per_call", type=int, default=EngineConfig.decode_steps_per_call,
                   help="decode steps per dispatch (a loop inside the jitted step that stops at EOS; same tokens)")
    p.add_argument("--guess_first_block", choices=["auto", "on", "off"], default="auto",
                   help="pregated/speculative: start copying the first decoder MoE block's experts of the "
                   "previous step before its gate runs (EngineConfig.guess_first_block; same tokens; auto: "
                   "when batch x beams = 1)")
    p.add_argument("--xla_command_buffers", choices=["loops", "xla-default"], default="loops",
                   help="loops: run the decode loop as one CUDA graph (pregated_jax.engine.xla_flags; unless "
                   "XLA_FLAGS sets command buffers); xla-default: leave XLA_FLAGS alone")
    p.add_argument("--copy_method", choices=["auto", "xla", "dma"], default=EngineConfig.copy_method,
                   help="how routed experts are copied: dma (native copy-engine transfers that overlap "
                   "computation), xla (XLA's copy kernels), auto (dma on a GPU when it builds)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype (default: the checkpoint's)")
    p.add_argument("--profile", action="store_true", help="also time every MoE block (a synchronized pass)")
    p.add_argument("--warmup", action="store_true", help="compile with a first, untimed run of each batch")
    p.add_argument("--json", help="write outputs and statistics here")
    return p.parse_args(argv)


def read_inputs(args) -> list[str]:
    texts = list(args.text)
    if args.file:
        path = Path(args.file)
        if not path.exists():
            raise SystemExit(f"error: --file {path} does not exist")
        texts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not texts and not sys.stdin.isatty() and not args.text and not args.file:
        texts = [line.strip() for line in sys.stdin if line.strip()]
    if not texts:  # demo inputs: held-out Debian descriptions
        from pregated_jax.data import debian_source

        texts = [ex["inputs"] for _, ex in zip(range(4), debian_source("validation"))]
    return texts


def main(argv=None):
    args = parse_args(argv)
    from pregated_jax.engine.xla_flags import use_command_buffer_loops, use_eager_module_loading
    use_eager_module_loading()  # before the first JAX computation
    if args.xla_command_buffers == "loops":
        use_command_buffer_loops()
    import numpy as np
    from tqdm import tqdm

    from pregated_jax.data.tokenizer import Tokenizer
    from pregated_jax.engine import GUESS_FIRST_BLOCK_CHOICES, InferenceEngine
    from pregated_jax.loading import load_model, vocabulary_for

    texts = read_inputs(args)
    print(f"loading {args.checkpoint} ...", file=sys.stderr)
    model = load_model(args.checkpoint, dtype=args.dtype)
    cfg = model.config
    mode = args.mode or ("pregated" if cfg.routing == "pregated" else "speculative")
    engine = InferenceEngine(model, mode=mode, cache_policy=args.cache, cache_experts=args.cache_experts,
                             device_budget_bytes=int(args.device_budget_gib * 2**30) if args.device_budget_gib else None,
                             decode_steps_per_call=args.decode_steps_per_call, copy_method=args.copy_method,
                             guess_first_block=GUESS_FIRST_BLOCK_CHOICES[args.guess_first_block])
    del model
    tok = Tokenizer(vocabulary_for(args.checkpoint))
    print(f"{cfg.num_experts} experts x {len(cfg.sparse_blocks('encoder')) + len(cfg.sparse_blocks('decoder'))} "
          f"MoE blocks, routing {cfg.routing}, engine mode {mode}, {len(texts)} input(s)", file=sys.stderr)

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
        if args.warmup:
            engine.generate(input_ids, mask, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
        res = engine.generate(input_ids, mask, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                              progress=lambda t, total: bar.update(1))
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
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "stats": [s.as_dict() for s in all_stats]},
                                              indent=1))
    return results


if __name__ == "__main__":
    main()
