"""Exports a checkpoint of ours (an Orbax training workdir or step folder) as a Hugging Face directory.

Runs as `pregated-export-hf`, `python -m pregated_jax.export_hf` or `python scripts/export_hf.py`.

    python scripts/export_hf.py --checkpoint runs/debian --out exported/ [--spiece path/to/spiece.model]

The output (config.json + model.safetensors, and the SentencePiece model) loads with
`pregated_jax.from_pretrained`, `scripts/infer.py --checkpoint`, and, for conventional models,
transformers' `SwitchTransformersForConditionalGeneration.from_pretrained`.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from pregated_jax.cli import HelpFormatter


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="training workdir, its checkpoints/ folder, or a step folder")
    p.add_argument("--out", required=True)
    p.add_argument("--spiece", help="SentencePiece model to ship with it (default: the bundled T5 vocabulary)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="store the weights in this type (default: as the checkpoint holds them)")
    args = p.parse_args(argv)

    from pregated_jax.data.tokenizer import default_vocab_path
    from pregated_jax.hf_checkpoint import save_pretrained
    from pregated_jax.loading import load_model

    model = load_model(args.checkpoint)
    out = save_pretrained(model, args.out, dtype=args.dtype)
    shutil.copyfile(args.spiece or default_vocab_path(), Path(out) / "spiece.model")
    print(f"wrote {out}: {sorted(f.name for f in Path(out).iterdir())}")


if __name__ == "__main__":
    main()
