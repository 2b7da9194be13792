"""Train (or fine-tune) a Switch Transformer; all logic lives in `pregated_jax.train.train_and_evaluate`.

Two config styles, resolving into the same `TrainConfig`:
  python scripts/train.py --gin_file configs/tiny.gin [--gin_file more.gin] [--gin.NAME=VALUE ...] --workdir W
  python scripts/train.py --config configs/tiny.py [--config.optimizer.learning_rate=3e-4 ...] --workdir W
Gin values are gin literals (strings quoted: --gin.DataConfig.task="'xsum'"); --config values are parsed
with the field's type. The resolved config is written to W/config.json (and W/operative_config.gin with gin).
Re-running with the same workdir resumes from its last checkpoint. `--mesh data=N,expert=M` trains data + expert
parallel over that device mesh (the config's `mesh` section: gin `MeshConfig.expert = M`, `--config.mesh.expert=M`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

from pregated_jax.mesh import parse_mesh  # noqa: E402
from pregated_jax.train.config import TrainConfig, config_from_gin, config_from_py  # noqa: E402


def parse_args(argv: list[str]) -> tuple[TrainConfig, Path, str | None]:
    """(config, workdir, operative gin text or None) from the command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="checkpoints, config.json, metrics.jsonl go here")
    parser.add_argument("--gin_file", action="append", default=[], help="gin config file (repeatable)")
    parser.add_argument("--config", help="Python config file exposing get_config()")
    parser.add_argument("--mesh", help="device mesh data=N,expert=M (-1: the devices left over); replaces the "
                                       "config's mesh section; default: the config's (one device)")
    args, rest = parser.parse_known_args(argv)
    gin_bindings, py_overrides = [], []
    i = 0
    while i < len(rest):
        arg = rest[i]
        for prefix, out in (("--gin.", gin_bindings), ("--config.", py_overrides)):
            if arg.startswith(prefix):
                name, eq, value = arg[len(prefix):].partition("=")
                if not eq:  # "--config.a.b value"
                    if i + 1 >= len(rest):
                        parser.error(f"{arg} needs a value")
                    i, value = i + 1, rest[i + 1]
                out.append((name, value))
                break
        else:
            parser.error(f"unrecognized argument {arg!r}")
        i += 1
    if bool(args.gin_file) == bool(args.config):
        parser.error("give either --gin_file (with --gin.NAME=VALUE) or --config (with --config.FIELD=VALUE)")
    if args.config:
        if gin_bindings:
            parser.error("--gin.* bindings need --gin_file")
        config, operative = config_from_py(args.config, py_overrides), None
    else:
        if py_overrides:
            parser.error("--config.* overrides need --config")
        config, operative = config_from_gin(args.gin_file, [f"{n} = {v}" for n, v in gin_bindings])
    if args.mesh is not None:
        config = config.replace(mesh=parse_mesh(args.mesh))
    return config, Path(args.workdir), operative


def main(argv: list[str] | None = None) -> dict:
    try:
        config, workdir, operative_gin = parse_args(sys.argv[1:] if argv is None else argv)
    except (ValueError, TypeError) as e:  # a config value of the wrong type or range, an unknown field
        raise SystemExit(f"error: {e}") from None
    workdir.mkdir(parents=True, exist_ok=True)
    if operative_gin is not None:
        (workdir / "operative_config.gin").write_text(operative_gin)
    from pregated_jax.train.loop import train_and_evaluate  # heavy imports after argument errors

    try:
        metrics = train_and_evaluate(config, workdir)
    except OSError as e:  # e.g. a checkpoints folder that cannot be written: the error names it and the cause
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
