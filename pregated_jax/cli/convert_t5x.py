"""Converts a T5X checkpoint (e.g. an original Switch Transformer release) to our Orbax format or to Hugging Face's.

Runs as `pregated-convert-t5x`, `python -m pregated_jax.convert_t5x` or `python scripts/convert_t5x.py`.

    python scripts/convert_t5x.py --t5x switch_base_8/checkpoint_500100 --out converted/ [--format ours|hf]
        [--config switch-base-8 | --config path/to/config.json]

--t5x takes a step folder (msgpack `checkpoint` + zarr arrays) or a folder of checkpoint_<step>/ (the highest
step is read). Without --config, a config.json in that folder is used, else the config is inferred from the shapes
(`pregated_jax.t5x_checkpoint.infer_config` says which fields that leaves at the public checkpoints' values).

--format ours (default) writes `OUT/<step>/{params,config}`, the params-only layout of our training
checkpoints: `pregated_jax.load_model(OUT)`, `scripts/infer.py --checkpoint OUT` and training's
`init.from_checkpoint` read it. --format hf writes config.json + model.safetensors (+ spiece.model), which
`transformers.SwitchTransformersForConditionalGeneration.from_pretrained` loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
from pathlib import Path

from pregated_jax.cli import HelpFormatter


def save_ours(model, out: Path, step: int) -> Path:
    """Writes `model` as `out/<step>/{params,config}` (Orbax), the items `restore_model` reads."""
    import orbax.checkpoint as ocp
    from flax import nnx

    handlers = {"params": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler()}
    manager = ocp.CheckpointManager(out.resolve(), options=ocp.CheckpointManagerOptions(create=True),
                                    item_handlers=handlers)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    config = {"model_config": dataclasses.asdict(model.config), "train_config": {}}
    manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                               config=ocp.args.JsonSave(config)), force=True)
    manager.wait_until_finished()
    manager.close()
    return out / str(step)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--t5x", required=True, help="T5X step folder, or a folder of checkpoint_<step>/ folders")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", choices=["ours", "hf"], default="ours",
                   help="ours: Orbax params + config (default); hf: Hugging Face config.json + model.safetensors")
    p.add_argument("--config", help="preset name (e.g. switch-base-8) or a Hugging Face config.json; default: "
                                    "a config.json in the checkpoint folder, else inferred from the array shapes")
    args = p.parse_args(argv)

    from pregated_jax.hf_checkpoint import CheckpointError, save_pretrained
    from pregated_jax.t5x_checkpoint import load_t5x, step_directory

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: --out {out} exists and is not a folder")
    source = step_directory(args.t5x)
    named = re.fullmatch(r"checkpoint_(\d+)", source.name) if source else None  # t5x names step folders by step
    step = int(named.group(1)) if named else 0
    if args.format == "ours" and (out / str(step)).exists():
        raise SystemExit(f"error: {out / str(step)} already exists")
    try:
        model = load_t5x(args.t5x, config=args.config)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    if args.format == "hf":
        from pregated_jax.data.tokenizer import default_vocab_path

        written = save_pretrained(model, out)
        shutil.copyfile(default_vocab_path(), Path(written) / "spiece.model")
    else:
        written = save_ours(model, out, step)
    print(f"wrote {written} ({args.format} format) from {source}")
    return written


if __name__ == "__main__":
    main()
