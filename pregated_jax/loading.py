"""One entry point for every kind of checkpoint the project reads, and the built-in default model."""

from __future__ import annotations

from pathlib import Path

from pregated_jax.model import SwitchTransformer

DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "default_model"


def load_model(path: str | Path = "default", dtype: str | None = None, experts_on: str = "device") -> SwitchTransformer:
    """Loads a model from:
    - "default": the small pre-gated model bundled with the package (Debian descriptions -> synopsis);
    - a Hugging Face checkpoint directory (config.json + safetensors / .bin weights);
    - a T5X checkpoint (msgpack `checkpoint` + zarr arrays, or newer t5x's Orbax `state/`; a step folder or a
      folder of checkpoint_<step>/), its model config from a config.json beside it, else inferred from the
      array shapes (`pregated_jax.t5x_checkpoint.load_t5x`);
    - an Orbax checkpoint of ours (a training workdir, its checkpoints/ folder, or one step folder), with the
      expert placement of a `placement.json` in the step folder (`pregated_jax.expert_placement`);
    - a quantized expert store (`scripts/quantize.py`, `pregated_jax.quant_store`): experts stay quantized.

    `experts_on="host"` puts the expert stacks straight into host memory (pinned where the device has it,
    `model.host_memory_kind`), where the inference engine keeps them: a model whose experts do not fit the
    device loads without their passing through it. Hugging Face, T5X and quantized checkpoints read them into
    numpy first; an Orbax checkpoint of ours is restored to the device and then moved. "device" (default)
    puts them on the device with the rest.
    """
    from pregated_jax.model import expert_memory_kind

    expert_memory_kind(experts_on)  # checks the value before anything is read
    if str(path) == "default":
        path = DEFAULT_MODEL_DIR
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"the built-in default model is missing from {path}; reinstall the package")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    from pregated_jax.hf_checkpoint import WEIGHT_FILES, from_pretrained
    from pregated_jax.t5x_checkpoint import is_t5x_checkpoint, load_t5x

    if is_t5x_checkpoint(path):
        return load_t5x(path, dtype=dtype, experts_on=experts_on)
    from pregated_jax.quant_store import is_quantized_store, load_quantized

    if is_quantized_store(path):
        return load_quantized(path, dtype=dtype, experts_on=experts_on)
    if any((path / name).exists() for name in WEIGHT_FILES):
        return from_pretrained(path, dtype=dtype, experts_on=experts_on)
    from pregated_jax.train.checkpoints import restore_model, step_dir

    try:
        orbax = (step_dir(path) / "params").is_dir()
    except FileNotFoundError:
        orbax = False
    if not orbax:
        raise FileNotFoundError(_no_model_message(path, WEIGHT_FILES))
    from pregated_jax.expert_placement import restore_placement

    return restore_placement(restore_model(path, dtype=dtype, experts_on=experts_on), step_dir(path))


def _no_model_message(path: Path, weight_files) -> str:
    """What `load_model` looked for in a folder that holds no model of any kind it reads."""
    from pregated_jax.quant_store import STORE_FILE

    has_config = " (config.json is there, but no weights file)" if (path / "config.json").is_file() else ""
    return (f"no model in {path}{has_config}: looked for Hugging Face weights ({', '.join(weight_files)}), "
            "a T5X checkpoint (checkpoint_<step>/ holding a msgpack 'checkpoint' file or an Orbax 'state'), "
            f"a quantized store ({STORE_FILE}) and an Orbax checkpoint of ours (<step>/params or "
            "checkpoints/<step>/params)")


def vocabulary_for(path: str | Path = "default") -> str:
    """The SentencePiece model that goes with a checkpoint: its own spiece.model, else the T5 vocabulary."""
    from pregated_jax.data.tokenizer import default_vocab_path

    directory = DEFAULT_MODEL_DIR if str(path) == "default" else Path(path)
    own = directory / "spiece.model"
    return str(own) if own.exists() else default_vocab_path()
