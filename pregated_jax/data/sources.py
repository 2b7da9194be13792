"""Example sources: iterables of {"inputs": str, "targets": str} dicts, and the task registry.

QA sources add "answers": list[str] (every gold answer) so the evaluator can score EM/F1 against all of
them; batching ignores keys other than "inputs" and "targets".

- `debian_source(split)`: the bundled Debian-descriptions summarization task (real text, works offline).
- `local_source(path, input_field, target_field, prefix="")`: a user's .jsonl, .jsonl.gz or .tsv file.
- `tfds_source(name, split, data_dir=None)`: the paper's tasks through TensorFlow Datasets.
- `get_task(name)` -> Task(source, metric) for "debian", "xsum", "squad", "web_questions".
- `grain_source(task, split)`, `local_grain_source(...)`, `tfds_grain_source(...)`: the same examples as a
  random-access grain MapDataset, for the training pipeline (`grain_pipeline`).
"""

from __future__ import annotations

import csv
import gzip
import json
import os
from importlib import resources
from typing import Callable, Iterator, NamedTuple

Example = dict  # {"inputs": str, "targets": str[, "answers": list[str]]}

DEBIAN_SPLIT_SIZES = {"train": 49_050, "validation": 2_628}
SUMMARIZE_PREFIX = "summarize: "


def _open_text(path: str):
    """Open .gz files transparently, as UTF-8 text."""
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, "r", encoding="utf-8", newline="")


def _jsonl_records(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-blank line of a JSON-lines file."""
    with _open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: malformed JSON "
                                 f"({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {lineno}: expected a JSON object, "
                                 f"got {type(record).__name__}")
            yield lineno, record


def _tsv_records(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each row of a TSV file whose first row names the fields."""
    with _open_text(path) as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty TSV file (expected a header row naming the fields)")
        for row in reader:
            lineno = reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != len(header):
                raise ValueError(f"{path}, line {lineno}: {len(row)} tab-separated columns, "
                                 f"but the header names {len(header)} ({', '.join(header)})")
            yield lineno, dict(zip(header, row))


class MissingFieldError(KeyError):
    """A record lacks a requested field (a KeyError whose message prints without repr quotes)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _field(record: dict, field: str, path: str, lineno: int) -> str:
    if field not in record:
        raise MissingFieldError(f"{path}, line {lineno}: field {field!r} not present; "
                       f"fields there: {', '.join(map(str, record)) or '(none)'}")
    value = record[field]
    if not isinstance(value, str):  # a null, number or list would be scored as its str() ("None", "3")
        shown = "null" if value is None else (f"{json.dumps(value)[:80]} "
                                              f"({_JSON_TYPES.get(type(value), type(value).__name__)})")
        raise ValueError(f"{path}, line {lineno}: field {field!r} is {shown}; it must be a string")
    return value


_JSON_TYPES = {bool: "a boolean", int: "a number", float: "a number", list: "an array", dict: "an object"}


def local_source(path: str | os.PathLike, input_field: str, target_field: str,
                 prefix: str = "") -> Iterator[Example]:
    """Examples from a user's file: `.jsonl`, `.jsonl.gz` (one JSON object per line) or `.tsv`/`.tsv.gz`
    (tab-separated, first row = field names, no quoting). `inputs` = prefix + record[input_field],
    `targets` = record[target_field].

    Raises FileNotFoundError naming a missing file; ValueError naming file and line for a malformed line
    or a field whose value is not a string (null, number, array, object);
    MissingFieldError (a KeyError) naming the field, file and line, and listing the fields there.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Data file not found: {path}")
    name = path[:-3] if path.endswith(".gz") else path
    if name.endswith(".jsonl") or name.endswith(".json"):
        records = _jsonl_records(path)
    elif name.endswith(".tsv"):
        records = _tsv_records(path)
    else:
        raise ValueError(f"{path}: unsupported file type (expected .jsonl, .jsonl.gz, .tsv or .tsv.gz)")
    return _records_to_examples(records, path, input_field, target_field, prefix)


def _records_to_examples(records, path, input_field, target_field, prefix) -> Iterator[Example]:
    for lineno, record in records:
        yield {"inputs": prefix + _field(record, input_field, path, lineno),
               "targets": _field(record, target_field, path, lineno)}


def debian_data_path(split: str) -> str:
    """Path of the bundled `debian_descriptions/{split}.jsonl.gz`."""
    if split not in DEBIAN_SPLIT_SIZES:
        raise ValueError(f"debian split must be one of {sorted(DEBIAN_SPLIT_SIZES)}, got {split!r}")
    return str(resources.files("pregated_jax").joinpath("assets", "debian_descriptions", f"{split}.jsonl.gz"))


def debian_source(split: str = "train", data_dir: str | None = None) -> Iterator[Example]:
    """The bundled XSum-like task: a Debian package's long description -> its one-line synopsis.

    inputs = "summarize: " + document, targets = summary. 49,050 train / 2,628 validation examples.
    `data_dir` is accepted (and ignored) so every task's source has the same signature.
    """
    del data_dir
    return local_source(debian_data_path(split), "document", "summary", prefix=SUMMARIZE_PREFIX)


# --- TensorFlow Datasets -------------------------------------------------------------------------

_TFDS_NAMES = {"xsum": "xsum", "squad": "squad/v1.1", "web_questions": "web_questions"}


def _tfds_text(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _not_prepared(name: str, split: str, data_dir: str | None) -> str:
    how = "tfds build xsum --manual_dir MANUAL_DIR" if name == "xsum" else f"tfds build {_TFDS_NAMES[name]}"
    where = f" --data_dir {data_dir}" if data_dir else ""
    return (f"TFDS dataset {_TFDS_NAMES[name]} (split {split!r}) is not prepared in "
            f"{data_dir or '~/tensorflow_datasets'}: run `{how}{where}`")


def _xsum_example(ex) -> Example:
    return {"inputs": SUMMARIZE_PREFIX + _tfds_text(ex["document"]), "targets": _tfds_text(ex["summary"])}


def _squad_example(ex) -> Example:
    answers = [_tfds_text(a) for a in ex["answers"]["text"]]
    return {"inputs": f"question: {_tfds_text(ex['question'])} context: {_tfds_text(ex['context'])}",
            "targets": answers[0] if answers else "", "answers": answers}


def _web_questions_example(ex) -> Example:
    answers = [_tfds_text(a) for a in ex["answers"]]
    return {"inputs": "question: " + _tfds_text(ex["question"]),
            "targets": answers[0] if answers else "", "answers": answers}


_TFDS_CONVERTERS = {"xsum": _xsum_example, "squad": _squad_example, "web_questions": _web_questions_example}


def _import_tfds(name: str, caller: str):
    """The tensorflow_datasets module, with TensorFlow kept off the accelerators JAX uses."""
    if name not in _TFDS_CONVERTERS:
        raise ValueError(f"unknown TFDS task {name!r}; known: {', '.join(sorted(_TFDS_CONVERTERS))}")
    try:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(f"{caller}({name!r}) needs TensorFlow Datasets: "
                          "pip install tensorflow-datasets tensorflow-cpu") from e
    try:
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):
        pass
    return tfds


def tfds_source(name: str, split: str, data_dir: str | None = None, *, download: bool = False,
                manual_dir: str | None = None) -> Iterator[Example]:
    """The paper's tasks from TensorFlow Datasets, as {"inputs", "targets"[, "answers"]} examples.

    - "xsum" (splits train/validation/test): inputs "summarize: " + document, targets summary.
    - "squad" (`squad/v1.1`, splits train/validation): inputs "question: {q} context: {c}", targets the first
      answer, "answers" all of them.
    - "web_questions" (splits train/test; there is no validation split): inputs "question: " + question,
      targets the first answer, "answers" all of them.

    Preparing the data (once, into `data_dir`, default ~/tensorflow_datasets):
      pip install tensorflow-datasets tensorflow-cpu
      tfds build squad/v1.1 web_questions [--data_dir DIR]           # download from the web
      # XSum needs a manual download: run the scripts in
      # https://github.com/EdinburghNLP/XSum/blob/master/XSum-Dataset/README.md, pack the folder
      # `xsum-extracts-from-downloads` as `xsum-extracts-from-downloads.tar.gz` into MANUAL_DIR, then
      tfds build xsum --manual_dir MANUAL_DIR [--data_dir DIR]
    Or pass `download=True` (and `manual_dir=` for xsum) to prepare on first use.
    """
    tfds = _import_tfds(name, "tfds_source")
    kwargs = {}
    if manual_dir is not None:
        kwargs["download_and_prepare_kwargs"] = {
            "download_config": tfds.download.DownloadConfig(manual_dir=manual_dir)}
    tfds_name = _TFDS_NAMES[name]
    try:
        ds = tfds.load(tfds_name, split=split, data_dir=data_dir, download=download, shuffle_files=False,
                       **kwargs)
    except AssertionError as e:  # what TFDS raises for data that was never prepared
        raise FileNotFoundError(_not_prepared(name, split, data_dir) + f" or pass download=True ({e})") from e
    convert = _TFDS_CONVERTERS[name]
    return (convert(ex) for ex in tfds.as_numpy(ds))


def tfds_grain_source(name: str, split: str, data_dir: str | None = None):
    """A TFDS task's split as a grain MapDataset of examples (the `tfds_source` conversions).

    A dataset prepared as ArrayRecord (`tfds build NAME --file_format array_record`) is read with random
    access through `tfds.data_source`, nothing loaded up front; one prepared as TFRecord (the default) has
    no random access, so its examples are read once into a list.
    """
    import grain

    tfds = _import_tfds(name, "tfds_grain_source")
    try:
        source = tfds.data_source(_TFDS_NAMES[name], split=split, data_dir=data_dir, download=False)
    except AssertionError as e:  # never prepared
        raise FileNotFoundError(_not_prepared(name, split, data_dir) + f" ({e})") from e
    except (NotImplementedError, ValueError, TypeError):  # prepared without random access (TFRecord)
        return grain.MapDataset.source(list(tfds_source(name, split, data_dir)))
    return grain.MapDataset.source(source).map(_TFDS_CONVERTERS[name])


# --- task registry -------------------------------------------------------------------------------

class Task(NamedTuple):
    """What a task name resolves to: `source(split, data_dir=None)` -> examples, and the metric kind."""

    source: Callable[..., Iterator[Example]]
    metric: str  # "rouge" (summarization) or "qa" (exact match / F1)


def _tfds_factory(name: str) -> Callable[..., Iterator[Example]]:
    def source(split: str, data_dir: str | None = None, **kwargs) -> Iterator[Example]:
        return tfds_source(name, split, data_dir, **kwargs)
    source.__name__ = source.__qualname__ = f"{name}_source"
    source.__doc__ = f"tfds_source({name!r}, split, data_dir, ...)"
    return source


TASKS: dict[str, Task] = {
    "debian": Task(debian_source, "rouge"),
    "xsum": Task(_tfds_factory("xsum"), "rouge"),
    "squad": Task(_tfds_factory("squad"), "qa"),
    "web_questions": Task(_tfds_factory("web_questions"), "qa"),
}

# The split each task is evaluated on (web_questions has no validation split).
EVAL_SPLITS = {"debian": "validation", "xsum": "validation", "squad": "validation", "web_questions": "test"}


def get_task(name: str) -> Task:
    """Task(source, metric) for "debian", "xsum", "squad" or "web_questions"; unpacks as a 2-tuple."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


def count_examples(task: str, split: str, data_dir: str | None = None) -> int:
    """Number of examples in a task's split, without reading the data where the count is known: the bundled
    Debian splits, and prepared TFDS datasets (from their metadata)."""
    get_task(task)  # validates the name
    if task == "debian":
        debian_data_path(split)  # validates the split
        return DEBIAN_SPLIT_SIZES[split]
    import tensorflow_datasets as tfds  # only reached for TFDS tasks
    builder = tfds.builder(_TFDS_NAMES[task], data_dir=data_dir)
    try:
        return builder.info.splits[split].num_examples
    except KeyError:
        raise FileNotFoundError(_not_prepared(task, split, data_dir)) from None


def grain_source(task: str, split: str, data_dir: str | None = None):
    """A task's split as a grain MapDataset of {"inputs", "targets"} examples: TFDS tasks through
    `tfds_grain_source`; the others (the bundled Debian task) read into a list of examples (raw text; the
    training pipeline tokenizes lazily, example by example)."""
    import grain

    source = get_task(task).source
    if task in _TFDS_CONVERTERS and source.__name__ == f"{task}_source":
        return tfds_grain_source(task, split, data_dir)
    return grain.MapDataset.source(list(source(split, data_dir=data_dir)))


def local_grain_source(path: str | os.PathLike, input_field: str, target_field: str, prefix: str = ""):
    """`local_source`'s examples as a grain MapDataset (the file is read once into a list)."""
    import grain

    return grain.MapDataset.source(list(local_source(path, input_field, target_field, prefix)))
