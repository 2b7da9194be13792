"""Training configuration: frozen dataclasses, and the two front-ends that resolve into them.

`TrainConfig` nests one dataclass per concern (model, optimizer, training loop, data, init, mesh). Library code
takes only these dataclasses; the front-ends live here so that tests and scripts share them:

- `config_from_py(path, overrides)`: a Python file exposing `get_config() -> TrainConfig`, plus dotted
  overrides `{"optimizer.learning_rate": "3e-4"}` parsed with the field's type (big_vision / ml_collections
  style). `model.overrides.<SwitchConfig field>` sets one model field.
- `config_from_gin(files, bindings)`: gin files and `NAME=VALUE` bindings over the configurables
  `ModelConfig`, `OptimizerConfig`, `TrainingConfig`, `DataConfig`, `InitConfig`, `MeshConfig` (t5x
  style); gin's own errors name unknown configurables and parameters. gin is imported only here, only when
  used.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import inspect
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from pregated_jax.config import PRESETS, SwitchConfig, check_field_types, get_preset
from pregated_jax.mesh import MeshConfig

_SWITCH_FIELDS = {f.name for f in dataclasses.fields(SwitchConfig)}


def _check_choice(owner: str, name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{owner}.{name} must be one of {list(choices)}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A preset name plus SwitchConfig field overrides. With `InitConfig.from_checkpoint` the checkpoint's
    own config replaces the preset and only the overrides (dtype, dropout, capacity, ...) apply on top."""

    preset: str = "tiny"
    overrides: dict = dataclasses.field(default_factory=dict)  # SwitchConfig field -> value

    def __post_init__(self):
        check_field_types(self)
        if self.preset not in PRESETS:
            raise ValueError(f"ModelConfig.preset {self.preset!r} is unknown; known: {sorted(PRESETS)}")
        unknown = sorted(set(self.overrides) - _SWITCH_FIELDS)
        if unknown:
            raise ValueError(f"ModelConfig.overrides: unknown SwitchConfig field(s) {unknown}")
        self.build()  # validates the values

    def build(self) -> SwitchConfig:
        return get_preset(self.preset, **self.overrides)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    name: Literal["adafactor", "adamw"] = "adafactor"
    learning_rate: float = 1e-3  # peak learning rate
    schedule: Literal["constant", "linear_warmup_rsqrt", "cosine"] = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0  # decoupled (AdamW) / Adafactor's weight_decay_rate
    grad_clip_norm: float | None = None  # global-norm clipping before the optimizer; None: off

    def __post_init__(self):
        check_field_types(self)
        _check_choice("OptimizerConfig", "name", self.name, ("adafactor", "adamw"))
        _check_choice("OptimizerConfig", "schedule", self.schedule, ("constant", "linear_warmup_rsqrt", "cosine"))
        if self.warmup_steps < 0 or self.learning_rate <= 0:
            raise ValueError("OptimizerConfig: learning_rate must be > 0 and warmup_steps >= 0")


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    batch_size: int = 8
    max_input_len: int = 256
    max_target_len: int = 64
    num_steps: int = 1000
    eval_every: int = 500  # steps between evaluations (and at the end)
    eval_steps: int = 8  # eval batches per evaluation
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    seed: int = 0  # model init, dropout/jitter RNG, data shuffling
    log_every: int = 50
    tensorboard: bool = True  # also write TensorBoard events (needs the `tensorboard` package)
    async_checkpointing: bool = True  # save checkpoints in Orbax's background threads (False: block until written)

    def __post_init__(self):
        check_field_types(self)  # e.g. gin's num_steps='abc', before the comparisons below
        for name in ("batch_size", "max_input_len", "max_target_len", "eval_every", "eval_steps",
                     "checkpoint_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainingConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_steps < 0:
            raise ValueError(f"TrainingConfig.num_steps must be >= 0, got {self.num_steps}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where batches come from when `train_and_evaluate` is not handed them (see `pregated_jax.data`)."""

    task: str = "debian"  # "debian", "xsum", "squad", "web_questions", or "local" (the paths below)
    train_path: str | None = None  # local .jsonl/.jsonl.gz/.tsv (task "local")
    eval_path: str | None = None
    input_field: str = "inputs"
    target_field: str = "targets"
    input_prefix: str = ""  # prepended to every input of a local file, e.g. "summarize: "
    data_dir: str | None = None  # TFDS data_dir / Debian data folder; None: default
    eval_split: str | None = None  # None: the task's usual evaluation split
    # Train batches hold several examples per row (grain first-fit packing, segment ids + positions); eval
    # batches stay one example per row.
    pack: bool = False
    packing_bins: int | None = None  # rows grain packs at once; None: the batch's rows (more: tighter, more memory)
    # Processes that read, tokenize, pack and collate train batches ahead of the training loop (grain's
    # mp_prefetch); 0: threads of the training process. A small model's step on a GPU is shorter than one
    # process takes to make its batch; a resume needs the same worker_count as the run it resumes.
    worker_count: int = 0

    def __post_init__(self):
        check_field_types(self)
        if self.packing_bins is not None and self.packing_bins <= 0:
            raise ValueError(f"DataConfig.packing_bins must be positive or None, got {self.packing_bins}")
        if self.worker_count < 0:
            raise ValueError(f"DataConfig.worker_count must be >= 0, got {self.worker_count}")
        from pregated_jax.data.sources import TASKS  # the registry; imports no dataset library

        _check_choice("DataConfig", "task", self.task, [*TASKS, "local"])


@dataclasses.dataclass(frozen=True)
class InitConfig:
    from_checkpoint: str | None = None  # a Hugging Face dir, one of our workdirs / step dirs, or None
    convert_to_pregated: bool = False  # after loading, add pre-gates (`pregated_jax.convert.to_pregated`)

    def __post_init__(self):
        check_field_types(self)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig | SwitchConfig = dataclasses.field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    init: InitConfig = dataclasses.field(default_factory=InitConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)  # device mesh; default one device

    def model_config(self) -> SwitchConfig:
        """The SwitchConfig of a fresh model (a checkpoint may supply its own instead)."""
        return self.model if isinstance(self.model, SwitchConfig) else self.model.build()

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        """Inverse of `to_dict` (for config.json); unknown keys fail."""
        m = d.get("model", {})
        model = ModelConfig(**m) if "preset" in m or not m else SwitchConfig(**m)
        parts = {name: sub(**d.get(name, {})) for name, sub in _SECTIONS.items() if name != "model"}
        return cls(model=model, **parts)


_SECTIONS = {"model": ModelConfig, "optimizer": OptimizerConfig, "training": TrainingConfig,
             "data": DataConfig, "init": InitConfig, "mesh": MeshConfig}


# --- config files ----------------------------------------------------------------------------------

def configs_dir() -> Path:
    """The shipped configs folder: `pregated_jax/configs` in an installed package (pyproject.toml maps the
    repository's `configs/` there), else `configs/` beside the package in a source checkout."""
    package = Path(__file__).resolve().parents[1]
    for folder in (package / "configs", package.parent / "configs"):
        if folder.is_dir():
            return folder
    raise FileNotFoundError(f"no configs folder: neither {package / 'configs'} nor {package.parent / 'configs'}")


def find_config_file(name: str | Path, search_paths: Sequence[str | Path] = ()) -> Path:
    """A config file: `name` itself (absolute, or relative to the working directory), else under each of
    `search_paths`, else in the shipped configs folder as `tiny.gin` or `configs/tiny.gin`."""
    name = Path(name)
    if name.is_file():
        return name.resolve()
    folders = [Path(s) for s in search_paths]
    try:
        shipped = configs_dir()
        folders += [shipped, shipped.parent]
    except FileNotFoundError:
        pass
    for folder in folders if not name.is_absolute() else []:
        if (folder / name).is_file():
            return (folder / name).resolve()
    looked = [str(name)] + ([str(f / name) for f in folders] if not name.is_absolute() else [])
    raise FileNotFoundError(f"config file {str(name)!r} not found; looked for {', '.join(looked)}")


# --- Python config files and dotted overrides ----------------------------------------------------

def parse_value(text: str, tp, where: str):
    """Parses a command-line string into type `tp` (int, float, bool, str, Literal, X | None, dict)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if text.strip().lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return parse_value(text, arg, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(f"{where}: cannot parse {text!r} as {tp}: {'; '.join(errors)}")
    if origin is Literal:
        value = _literal(text)
        if value not in args:
            raise ValueError(f"{where}: {text!r} is not one of {list(args)}")
        return value
    if tp is bool:
        low = text.strip().lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError(f"{where}: {text!r} is not a bool")
    if tp in (int, float):
        try:
            value = float(text) if tp is float else int(text)
        except ValueError:
            raise ValueError(f"{where}: {text!r} is not a {tp.__name__}") from None
        return value
    if tp is str:
        value = _literal(text)
        return value if isinstance(value, str) else text
    if tp is dict or origin is dict:
        value = _literal(text)
        if not isinstance(value, dict):
            raise ValueError(f"{where}: {text!r} is not a dict literal")
        return value
    return _literal(text)  # Any


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_override(config, dotted: str, text: str, where: str = "config"):
    """Returns `config` with the field at `dotted` (e.g. "optimizer.learning_rate") set from `text`."""
    head, _, rest = dotted.partition(".")
    here = f"{where}.{head}"
    if isinstance(config, ModelConfig) and head == "overrides" and rest:
        if rest not in _SWITCH_FIELDS or "." in rest:
            raise ValueError(f"unknown config field {here}.{rest}: SwitchConfig has no field {rest!r}")
        value = parse_value(text, typing.get_type_hints(SwitchConfig)[rest], f"{here}.{rest}")
        return dataclasses.replace(config, overrides={**config.overrides, rest: value})
    names = {f.name for f in dataclasses.fields(config)}
    if head not in names:
        raise ValueError(f"unknown config field {here}: {type(config).__name__} has fields {sorted(names)}")
    if rest:
        return dataclasses.replace(config, **{head: apply_override(getattr(config, head), rest, text, here)})
    tp = typing.get_type_hints(type(config))[head]
    if dataclasses.is_dataclass(getattr(config, head)):
        raise ValueError(f"config field {here} is a section; set one of its fields, e.g. {here}.<name>=...")
    return dataclasses.replace(config, **{head: parse_value(text, tp, here)})


def config_from_py(path: str | Path, overrides: Mapping[str, str] | Sequence[tuple[str, str]] = (),
                   config_arg: str | None = None) -> TrainConfig:
    """Loads `get_config()` (or `get_config(config_arg)`, ml_collections' `path.py:arg`) from a Python file
    (found by `find_config_file`) and applies dotted string overrides in order."""
    path = find_config_file(path)
    spec = importlib.util.spec_from_file_location(f"_train_config_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot load a Python config from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} has no get_config()")
    if config_arg is None:
        config = module.get_config()
    else:
        try:
            inspect.signature(module.get_config).bind(config_arg)
        except TypeError:
            raise TypeError(f"{path}: get_config() takes no argument, but the config was given one: "
                            f"{config_arg!r} (from {path}:{config_arg})") from None
        config = module.get_config(config_arg)
    if not isinstance(config, TrainConfig):
        raise TypeError(f"{path}: get_config() returned {type(config).__name__}, expected TrainConfig")
    items = overrides.items() if isinstance(overrides, Mapping) else overrides
    for dotted, text in items:
        config = apply_override(config, dotted, text)
    return config


# --- gin -------------------------------------------------------------------------------------------

_GIN_CONFIGURABLES: dict = {}


def _gin_configurables() -> dict:
    """Registers the section dataclasses with gin once (by class name) and returns the gin wrappers."""
    import gin

    if not _GIN_CONFIGURABLES:
        for cls in _SECTIONS.values():
            _GIN_CONFIGURABLES[cls.__name__] = gin.external_configurable(cls, name=cls.__name__)
    return _GIN_CONFIGURABLES


def _include_folders(files: Sequence[str | Path],
                     search_folders: Sequence[Path] = ()) -> tuple[list[Path], list[Path]]:
    """(folders, files read): for every (nested) `include 'x.gin'`, the nearest ancestor folder of the including
    file holding x.gin, else the first of `search_folders` holding it; and `files` with every file included."""
    folders, seen, todo = [], [], [Path(f).resolve() for f in files]
    while todo:
        f = todo.pop()
        if f in seen or not f.is_file():
            continue
        seen.append(f)
        for inc in re.findall(r"^\s*include\s+['\"]([^'\"]+)['\"]", f.read_text(), re.M):
            folder = next((d for d in [*f.parents, *search_folders] if (d / inc).is_file()), None)
            if folder is not None:
                folders.append(folder)
                todo.append((folder / inc).resolve())
    return folders, seen


_BINDING_NAME = re.compile(r"\s*([A-Za-z_][\w./]*)\s*=")


def _check_bindings_used(bindings: Sequence[str], texts: str) -> None:
    """Raises a ValueError for a binding that training would ignore: one of a configurable other than the
    `TrainConfig` sections, or of a macro that no gin file or binding refers to (`MODEL_DIR` excepted)."""
    sections = sorted(cls.__name__ for cls in _SECTIONS.values())
    for binding in bindings:
        match = _BINDING_NAME.match(binding)
        if match is None:  # an include or import line; gin reports a malformed one
            continue
        name = match.group(1).split("/")[-1]  # a scoped binding: scope/Configurable.param
        if "." in name:
            configurable = name.rsplit(".", 1)[0].split(".")[-1]
            if configurable not in sections:
                raise ValueError(f"gin binding {binding.strip()!r} is not used: training reads only the "
                                 f"configurables {sections}")
        elif name != "MODEL_DIR" and not re.search(rf"%{re.escape(name)}\b", texts):
            raise ValueError(f"gin binding {binding.strip()!r} is not used: no gin file or binding refers "
                             f"to the macro %{name}")


def config_from_gin(files: Sequence[str | Path] = (), bindings: Sequence[str] = (),
                    search_paths: Sequence[str | Path] = (), model_dir: str | Path | None = None,
                    ) -> tuple[TrainConfig, str]:
    """(TrainConfig, operative gin config text) from gin files and `NAME=VALUE` bindings.

    gin's global config is cleared first. `search_paths` are added to gin's search path
    (`gin.add_config_file_search_path`); a file is found by `find_config_file` (as given, then in
    `search_paths`, then in the shipped configs folder). An `include` path is resolved against the nearest
    ancestor folder of the including file that holds it (so `configs/finetune/x.gin` may include
    'configs/pregate_finetune.gin' from any working directory), then gin's search path. `model_dir` binds
    the macro `MODEL_DIR` (t5x's name for the run's folder) before `bindings`. Unknown configurables or
    parameters fail with gin's error naming them; a binding training would ignore (`_check_bindings_used`)
    is a ValueError naming it.
    """
    import gin

    wrappers = _gin_configurables()
    folders = [Path(s).resolve() for s in search_paths]
    for folder in folders:
        if not folder.is_dir():
            raise ValueError(f"gin search path {str(folder)!r} is not a folder")
    files = [find_config_file(f, folders) for f in files]
    user_bindings, bindings = list(bindings), list(bindings)
    if model_dir is not None:
        bindings.insert(0, f"MODEL_DIR = {str(model_dir)!r}")
    gin.clear_config()
    prefixes = getattr(gin.config, "_LOCATION_PREFIXES", None)
    try:  # then the shipped configs, so a user's file may `include 'tiny.gin'` or 'configs/tiny.gin'
        shipped = [configs_dir(), configs_dir().parent]
    except FileNotFoundError:
        shipped = []
    for folder in folders + shipped:  # gin keeps its search path across calls: each folder is added once
        if prefixes is None or str(folder) not in prefixes:
            gin.add_config_file_search_path(str(folder))
    # Each include is searched in the including file's nearest ancestor folder that holds it (else the first
    # search or shipped folder that holds it), before gin's default (the working directory): gin's
    # package-resource lookup crashes on an include whose first folder is importable as a namespace package
    # (e.g. `configs` with the repository root on sys.path).
    include_folders, read = _include_folders(files, folders + shipped)
    for folder in include_folders:
        if prefixes is None:
            gin.add_config_file_search_path(str(folder))
        else:  # first, also when an earlier call added it behind the working directory
            if str(folder) in prefixes:
                prefixes.remove(str(folder))
            prefixes.insert(0, str(folder))
    gin.parse_config_files_and_bindings([str(f) for f in files], bindings)
    texts = "\n".join([*(f.read_text() for f in read), *user_bindings])
    _check_bindings_used(user_bindings, texts)
    parts = {name: wrappers[cls.__name__]() for name, cls in _SECTIONS.items()}
    # Rebuild with the plain classes so equality with Python-built configs is exact.
    plain = {name: _SECTIONS[name](**{f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
             for name, obj in parts.items()}
    return TrainConfig(**plain), gin.operative_config_str()
