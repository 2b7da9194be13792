"""The command-line form of the engine's options, defined once for every script that runs the engine.

It owns: one flag per `EngineConfig` field, spelled like the field (`--cache_policy`, `--guess_first_block`; the
one exception, `device_budget_bytes`, is given in GiB as `--device_budget_gib`), with its help text and the
meaning of its words (auto/on/off); the process settings those scripts make before JAX starts
(`--xla_command_buffers`); and `EngineConfig` as JSON, which a program passes to the processes it starts.

    parser = argparse.ArgumentParser()
    add_engine_flags(parser, mode=None)             # mode None: the one the model's routing needs
    add_process_flags(parser)
    args = parser.parse_args()
    prepare_process(args)                           # before the first JAX computation
    config = engine_config_from_args(args, routing=model.config.routing)
    assert from_json(to_json(config)) == config

The library itself takes `EngineConfig` values and knows nothing of these words.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any, Callable, Mapping

from pregated_jax.engine import MODES, EngineConfig
from pregated_jax.engine.cache import POLICIES
from pregated_jax.engine.fetch import COPY_METHODS
from pregated_jax.quant import FORMATS

GIB = 2**30
ON_OFF = {"on": True, "off": False}


@dataclasses.dataclass(frozen=True)
class Flag:
    """How one `EngineConfig` field reads on a command line."""

    help: str
    choices: Mapping[str, Any] | None = None  # flag word -> field value; None: the field's type parses the text
    unset: str = "none"  # what the field's None means, for --help
    name: str | None = None  # the flag's name where it is not the field's (it then has its own unit)
    parse: Callable[[str], Any] | None = None  # text -> field value, for a flag with its own unit
    show: Callable[[Any], str] = str  # field value -> text, for a flag with its own unit
    metavar: str = "N"  # the value's name in --help, for a flag without choices


def _choices(*values: str) -> dict[str, str]:
    return {v: v for v in values}


FLAGS: dict[str, Flag] = {
    "mode": Flag("engine mode", _choices(*MODES),
                 unset="the one the model's routing needs: pregated for pre-gated models, speculative for "
                       "conventional ones"),
    "cache_policy": Flag("device expert cache policy", _choices(*POLICIES), unset="no cache"),
    "cache_experts": Flag("device cache slots per MoE block", unset="what --device_budget_gib allows"),
    "device_budget_bytes": Flag("bound for all of the engine's expert buffers on the device together (cache "
                                "slots, slot tables, streaming buffers), in GiB; one below what the mode needs is "
                                "refused with the minimum", unset="unbounded", name="device_budget_gib",
                                parse=lambda text: int(float(text) * GIB), show=lambda b: f"{b / GIB:g}",
                                metavar="GIB"),
    "prefill_chunk": Flag("experts per copy when a call needs most experts of a block",
                          unset="all at once, or what the budget allows"),
    "check_every": Flag("decode steps between the host's checks whether every row has finished"),
    "decode_steps_per_call": Flag("decode steps per dispatch (a loop inside the jitted step that stops at EOS; "
                                  "same tokens)"),
    "stop_when_finished": Flag("end decoding once every row has emitted EOS (off: run every step up to the "
                               "token limit)", ON_OFF),
    "guess_first_block": Flag("pregated/speculative: start copying the experts the decoder's first MoE block used "
                              "at the previous step before its gate runs (same tokens)", ON_OFF),
    "guess_staging": Flag("with --guess_first_block on and the native copies: the guess's copy lands in buffers "
                          "the native library owns and stays in flight across the step boundary (same tokens)",
                          ON_OFF),
    "prefill_routed_only": Flag("calls that need most experts of a block (prefill) copy only the routed experts "
                                "(on) or whole blocks (off)", ON_OFF),
    "copy_method": Flag("how routed experts are copied: dma (native copy-engine transfers that overlap "
                        "computation), xla (XLA's copy kernels), auto (dma on a GPU where the native library "
                        "builds)", _choices("auto", *COPY_METHODS)),
    "expert_dtype": Flag("how expert weights are stored in host memory, copied and cached: bfloat16 (unquantized, "
                         "the model's dtype), int8 / float8_e4m3fn (per-channel scales), int4 (group-wise "
                         "scales, two values per byte); a quantized store needs its own format",
                         _choices(*FORMATS)),
    "expert_group_size": Flag("int4: input rows per scale (divides d_model and d_ff)"),
    "record_routing": Flag("count the tokens routed to each expert, per MoE block, into the statistics (a routing "
                           "trace for plan_placement.py; each device's load on a mesh)", ON_OFF),
}

# the field types whose flags parse their text without a choices table
_PARSERS = {"int": int, "int | None": int, "float": float, "float | None": float}


def flag_name(field: str) -> str:
    """The command-line flag of an `EngineConfig` field, without its dashes."""
    return FLAGS[field].name or field


def flag_text(field: str, value: Any) -> str:
    """An `EngineConfig` field's value as its flag writes it: 'on' for True, GiB for the budget."""
    flag = FLAGS[field]
    words = [word for word, v in (flag.choices or {}).items() if v is value or v == value]
    if words:
        return words[0]
    return flag.unset if value is None else flag.show(value)


def _parser_for(field: dataclasses.Field, flag: Flag) -> Callable[[str], Any] | None:
    if flag.choices is not None:
        def word(text: str) -> Any:
            if text not in flag.choices:
                raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(flag.choices)})")
            return flag.choices[text]
        return word
    if flag.parse is not None:
        return flag.parse
    type_name = getattr(field.type, "__name__", str(field.type))  # a string under `from __future__ import annotations`
    if type_name not in _PARSERS:
        raise TypeError(f"EngineConfig.{field.name}: type {type_name} needs choices or a parse function in "
                        f"pregated_jax.engine_cli.FLAGS")
    return _PARSERS[type_name]


def add_engine_flags(parser: argparse.ArgumentParser, *, exclude=(), **defaults) -> argparse._ArgumentGroup:
    """Adds a flag for every `EngineConfig` field but those in `exclude`, in a group of its own.

    `defaults` (field name -> field value) replaces `EngineConfig`'s default for this program, e.g.
    `mode=None` for "the one the model needs" (see `engine_config_from_args`). Parsed values are field values,
    stored under the field's name: `args.device_budget_bytes` holds bytes, `args.guess_first_block` None for auto.
    """
    fields = {f.name: f for f in dataclasses.fields(EngineConfig)}
    unknown = (set(exclude) | set(defaults)) - set(fields)
    if unknown:
        raise ValueError(f"not EngineConfig fields: {sorted(unknown)}")
    missing = sorted(set(fields) - set(FLAGS))
    if missing:
        raise KeyError(f"EngineConfig fields without a flag in pregated_jax.engine_cli.FLAGS: {missing}")
    group = parser.add_argument_group("engine options (EngineConfig)")
    for name, field in fields.items():
        if name in exclude:
            continue
        flag = FLAGS[name]
        default = defaults.get(name, field.default)
        metavar = "|".join(flag.choices) if flag.choices is not None else flag.metavar
        group.add_argument(f"--{flag_name(name)}", dest=name, type=_parser_for(field, flag), default=default,
                           metavar=metavar, help=f"{flag.help} (default: {flag_text(name, default)})")
    return group


def engine_config_from_args(args: argparse.Namespace, *, routing: str | None = None, **overrides) -> EngineConfig:
    """The `EngineConfig` of parsed flags (`add_engine_flags`): every field found on `args`, then `overrides`;
    fields on neither keep `EngineConfig`'s default. A mode left None becomes the one `routing` ("pregated" or
    "conventional", a model's `config.routing`) needs: pregated for pre-gated models, speculative otherwise."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig) if hasattr(args, f.name)}
    values.update(overrides)
    if "mode" in values and values["mode"] is None:
        if routing is None:
            raise ValueError("no engine mode given, and no routing to choose one for")
        values["mode"] = "pregated" if routing == "pregated" else "speculative"
    return EngineConfig(**values)


def to_json(config: EngineConfig) -> str:
    """`config` as a JSON object of its fields (every field's value is a JSON scalar)."""
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


def from_json(text: str) -> EngineConfig:
    """The `EngineConfig` of `to_json`'s text; a field `EngineConfig` does not have is an error."""
    values = json.loads(text)
    unknown = set(values) - {f.name for f in dataclasses.fields(EngineConfig)}
    if unknown:
        raise ValueError(f"not EngineConfig fields: {sorted(unknown)}")
    return EngineConfig(**values)


# --- the mesh -------------------------------------------------------------------------------------------

def add_mesh_flag(parser: argparse.ArgumentParser) -> None:
    """Adds --mesh: the devices the engine runs on (`mesh_from_args`)."""
    parser.add_argument("--mesh", metavar="data=N,expert=M",
                        help="run on a mesh of devices: expert weights split over `expert` (each device streams its "
                        "own experts), inputs over `data`; -1 = the devices left over, e.g. expert=-1 (default: one "
                        "device). On a CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N gives N devices")


def mesh_from_args(args: argparse.Namespace):
    """The `jax.sharding.Mesh` of --mesh, or None for one device; a bad value raises ValueError naming it."""
    from pregated_jax.mesh import MeshConfig, parse_mesh

    config = parse_mesh(getattr(args, "mesh", None))
    return None if config == MeshConfig() else config.make()


# --- process settings ----------------------------------------------------------------------------------

def add_process_flags(parser: argparse.ArgumentParser) -> None:
    """Adds --xla_command_buffers: the settings `prepare_process` makes."""
    parser.add_argument("--xla_command_buffers", choices=["loops", "xla-default"], default="loops",
                        metavar="loops|xla-default",
                        help="loops: run the decode loop as one CUDA graph (pregated_jax.engine.xla_flags; unless "
                        "XLA_FLAGS sets command buffers); xla-default: leave XLA_FLAGS alone (default: loops)")


def prepare_process(args: argparse.Namespace) -> None:
    """Sets CUDA_MODULE_LOADING=EAGER and, with --xla_command_buffers loops, XLA's loop command buffers in this
    process's environment (processes it starts inherit them). Call it before the first JAX computation."""
    from pregated_jax.engine.xla_flags import use_command_buffer_loops, use_eager_module_loading

    use_eager_module_loading()
    if args.xla_command_buffers == "loops":
        use_command_buffer_loops()
