"""Writes a quantized expert store from any checkpoint the project loads.

Runs as `pregated-quantize`, `python -m pregated_jax.quantize` or `python scripts/quantize.py`.

    python scripts/quantize.py --checkpoint checkpoints/switch-base-128 --expert_dtype int8 --out stores/base-128-int8

The store (`pregated_jax.quant_store`: config.json + quantized.safetensors, the format and the int4 group
size in its metadata) loads with `pj.load_model` and `scripts/infer.py --checkpoint DIR --expert_dtype int8`
without building the unquantized experts. The checkpoint's SentencePiece model (its own, else the T5
vocabulary) is copied beside it.
"""

from __future__ import annotations

import argparse
import shutil

from pregated_jax.cli import HelpFormatter


def main(argv=None):
    from pregated_jax.quant import DEFAULT_GROUP_SIZE, FORMATS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a Hugging Face directory, an Orbax checkpoint of ours, "
                                                       "a T5X checkpoint, or 'default'")
    p.add_argument("--expert_dtype", required=True, choices=[f for f in FORMATS if f != "bfloat16"])
    p.add_argument("--expert_group_size", type=int, default=DEFAULT_GROUP_SIZE,
                   help=f"int4: input rows per scale (default {DEFAULT_GROUP_SIZE}; must divide d_model and d_ff)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="the dtype the experts are read in and quantized from, and the store's compute dtype "
                        "(default: the checkpoint's). bfloat16 halves the host memory a float32 checkpoint needs "
                        "while it is quantized; a value then differs by one step where bf16's rounding crosses one")
    p.add_argument("--out", required=True, help="the store's directory (created)")
    args = p.parse_args(argv)

    from pregated_jax.loading import load_model, vocabulary_for
    from pregated_jax.quant_store import save_quantized

    # quantized from host memory, a few experts at a time; host-bound stacks are read in the compute dtype
    model = load_model(args.checkpoint, dtype=args.dtype, experts_on="host")
    out = save_quantized(model, args.out, args.expert_dtype, args.expert_group_size)
    shutil.copyfile(vocabulary_for(args.checkpoint), out / "spiece.model")  # the vocabulary that goes with it
    print(f"wrote {out}: {sorted(f.name for f in out.iterdir())}")


if __name__ == "__main__":
    main()
