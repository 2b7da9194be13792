"""Train (or fine-tune) a Switch Transformer; all logic lives in `pregated_jax.train.train_and_evaluate`.

Runs as `pregated-train`, `python -m pregated_jax.train` or `python scripts/train.py`.

Two config styles, resolving into the same `TrainConfig`:
  python scripts/train.py --gin_file configs/tiny.gin [--gin_file more.gin] [--gin.NAME=VALUE ...] --workdir W
  python scripts/train.py --config configs/tiny.py [--config.optimizer.learning_rate=3e-4 ...] --workdir W
Gin values are gin literals (strings quoted: --gin.DataConfig.task="'xsum'"); --gin_bindings 'NAME = VALUE'
(repeatable) is t5x's spelling of the same. A gin file is looked for as given, then in each --gin_search_paths
folder, then in the shipped configs (`--gin_file tiny.gin` works from an installed package); the macro
MODEL_DIR holds --workdir; a binding that training would not read is an error. `--config path.py:ARG` calls
get_config(ARG) (ml_collections' convention); --config values are parsed with the field's type.
The resolved config is written to W/config.json (and W/operative_config.gin with gin) and logged at start-up;
when stdout is not a terminal, the metrics are logged every TrainingConfig.log_every steps. A remote --workdir
(gs://...) is refused. Re-running with the same workdir resumes from its last checkpoint.
`--mesh data=N,expert=M` trains data + expert parallel over that device mesh (the config's `mesh` section:
gin `MeshConfig.expert = M`, `--config.mesh.expert=M`).
Several processes: `--coordinator_address HOST:PORT --num_processes N --process_id I` (else the environment's
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) start `jax.distributed` before anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

from pregated_jax.cli import HelpFormatter
from pregated_jax.distributed import initialize
from pregated_jax.mesh import parse_mesh
from pregated_jax.train.config import TrainConfig, config_from_gin, config_from_py


def parse_args(argv: list[str]) -> tuple[TrainConfig, Path, str | None]:
    """(config, workdir, operative gin text or None) from the command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--workdir", required=True, help="checkpoints, config.json, metrics.jsonl go here")
    parser.add_argument("--gin_file", action="append", default=[], help="gin config file (repeatable)")
    parser.add_argument("--gin_bindings", action="append", default=[], metavar="'NAME = VALUE'",
                        help="a gin binding (repeatable), as --gin.NAME=VALUE")
    parser.add_argument("--gin_search_paths", action="append", default=[], metavar="DIR[,DIR...]",
                        help="folders searched for gin files and includes (repeatable, or comma-separated)")
    parser.add_argument("--config", help="Python config file exposing get_config(); path.py:ARG passes ARG to it")
    parser.add_argument("--mesh", help="device mesh data=N,expert=M (-1: the devices left over); replaces the "
                                       "config's mesh section; default: the config's (one device)")
    parser.add_argument("--coordinator_address", help="several processes: HOST:PORT of process 0 (jax.distributed; "
                                                      "default: $JAX_COORDINATOR_ADDRESS, else one process)")
    parser.add_argument("--num_processes", type=int, help="several processes: how many (default: $JAX_NUM_PROCESSES)")
    parser.add_argument("--process_id", type=int, help="several processes: this one's id (default: $JAX_PROCESS_ID)")
    args, rest = parser.parse_known_args(argv)
    initialize(args.coordinator_address, args.num_processes, args.process_id)  # before anything touches devices
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", args.workdir):
        parser.error(f"--workdir {args.workdir}: remote workdirs are not supported (config.json, metrics.jsonl and "
                     f"TensorBoard events are written with local file APIs); give a local folder, e.g. a gcsfuse "
                     f"mount of the bucket")
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
    gin_bindings = [f"{n} = {v}" for n, v in gin_bindings] + args.gin_bindings
    search_paths = [s for arg in args.gin_search_paths for s in arg.split(",") if s]
    if bool(args.gin_file) == bool(args.config):
        parser.error("give either --gin_file (with --gin.NAME=VALUE) or --config (with --config.FIELD=VALUE)")
    if args.config:
        if gin_bindings or search_paths:
            parser.error("--gin.*, --gin_bindings and --gin_search_paths need --gin_file")
        path, arg = args.config, None
        if not Path(path).is_file() and ":" in path:  # path.py:ARG
            path, arg = path.rsplit(":", 1)
        config, operative = config_from_py(path, py_overrides, config_arg=arg), None
    else:
        if py_overrides:
            parser.error("--config.* overrides need --config")
        config, operative = config_from_gin(args.gin_file, gin_bindings, search_paths,
                                            model_dir=Path(args.workdir).resolve())
    if args.mesh is not None:
        config = config.replace(mesh=parse_mesh(args.mesh))
    return config, Path(args.workdir), operative


def main(argv: list[str] | None = None) -> dict:
    try:
        config, workdir, operative_gin = parse_args(sys.argv[1:] if argv is None else argv)
    except (ValueError, TypeError, FileNotFoundError) as e:  # a bad config value or field, a missing file
        raise SystemExit(f"error: {e}") from None
    workdir.mkdir(parents=True, exist_ok=True)
    import jax

    if operative_gin is not None and jax.process_index() == 0:  # one writer of the run's files (as the loop)
        (workdir / "operative_config.gin").write_text(operative_gin)
    from pregated_jax.train.loop import train_and_evaluate  # heavy imports after argument errors

    # The resolved config at start-up, and the metrics every log_every steps when stdout is not a terminal: this
    # package's INFO records, through the root logger's handler (one to stderr where nothing installed one).
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pregated_jax").setLevel(logging.INFO)

    try:
        metrics = train_and_evaluate(config, workdir)
    except OSError as e:  # e.g. a checkpoints folder that cannot be written: the error names it and the cause
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
