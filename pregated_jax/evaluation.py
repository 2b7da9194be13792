"""Task evaluation: generate with the inference engine, decode, and score (ROUGE or SQuAD EM/F1).

    from pregated_jax.evaluation import evaluate
    result = evaluate(model, "debian", max_examples=200, max_new_tokens=32)
    result["metrics"]      # {"rouge1": ..., "rouge2": ..., "rougeL": ...}  (F-measure x 100)
    result["predictions"]  # [{"input", "target", "prediction"[, "answers"]}, ...]
    result["stats"]        # engine figures summed over batches

Metrics:
- "rouge": ROUGE-1/2/L F-measure of `rouge_score` (Porter stemmer on), averaged over examples, x 100.
- "qa": SQuAD v1.1 exact match and token F1 after the official answer normalization (lowercase, drop
  punctuation, drop the articles a/an/the, collapse whitespace), the max over the gold answers, averaged
  over examples, x 100.
"""

from __future__ import annotations

import collections
import itertools
import re
import string
import sys
from typing import Iterable, Sequence

import numpy as np

METRICS = ("rouge", "qa")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


# --- ROUGE ---------------------------------------------------------------------------------------

def rouge_scores(predictions: Sequence[str], targets: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure x 100 of each prediction against its target (rouge_score, stemmed)."""
    from rouge_score import rouge_scorer

    _same_length(predictions, targets)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, target in zip(predictions, targets):
        scores = scorer.score(target, prediction)  # score(target, prediction): precision is over the prediction
        for k in ROUGE_TYPES:
            totals[k] += scores[k].fmeasure
    n = len(predictions)
    return {k: 100.0 * v / n if n else 0.0 for k, v in totals.items()}


# --- SQuAD v1.1 exact match / F1 -----------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD v1.1's normalization: lowercase, remove punctuation, remove articles, fix whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match_score(prediction: str, ground_truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def f1_score(prediction: str, ground_truth: str) -> float:
    """Token-level F1 of the normalized strings (0 when nothing overlaps, as in the official script)."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(ground_truth).split()
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _max_over_ground_truths(fn, prediction: str, ground_truths: Sequence[str]) -> float:
    return max(fn(prediction, gt) for gt in ground_truths)


def squad_scores(predictions: Sequence[str], answers: Sequence[Sequence[str] | str]) -> dict[str, float]:
    """Mean exact match and F1 x 100; `answers[i]` is the list of gold answers of example i (or one str)."""
    _same_length(predictions, answers)
    em = f1 = 0.0
    for i, (prediction, golds) in enumerate(zip(predictions, answers)):
        golds = [golds] if isinstance(golds, str) else list(golds)
        if not golds:
            raise ValueError(f"example {i} has no gold answers")
        em += _max_over_ground_truths(exact_match_score, prediction, golds)
        f1 += _max_over_ground_truths(f1_score, prediction, golds)
    n = len(predictions)
    return {"exact_match": 100.0 * em / n if n else 0.0, "f1": 100.0 * f1 / n if n else 0.0}


def score_predictions(predictions: Sequence[dict], metric: str) -> dict[str, float]:
    """Scores records {"prediction", "target"[, "answers"]} (the `predictions` of `evaluate`) by metric."""
    preds = [p["prediction"] for p in predictions]
    if metric == "rouge":
        return rouge_scores(preds, [p["target"] for p in predictions])
    if metric == "qa":
        return squad_scores(preds, [p.get("answers") or [p["target"]] for p in predictions])
    raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")


def _same_length(a, b):
    if len(a) != len(b):
        raise ValueError(f"{len(a)} predictions but {len(b)} references")


# --- examples ------------------------------------------------------------------------------------

def load_examples(task: str | Iterable[dict], split: str | None = None, max_examples: int | None = None,
                  data_dir: str | None = None) -> tuple[list[dict], str | None, str | None]:
    """(examples, metric, split) for a task name (metric and default split from the registry) or an
    iterable of {"inputs", "targets"[, "answers"]} examples (metric None: the caller decides)."""
    if max_examples is not None and max_examples < 0:
        raise ValueError(f"max_examples must be >= 0, got {max_examples}")
    if isinstance(task, str):
        from pregated_jax.data import EVAL_SPLITS, get_task

        source, metric = get_task(task)
        split = split or EVAL_SPLITS[task]
        examples = source(split, data_dir=data_dir)
    else:
        metric, examples = None, task
    examples = list(itertools.islice(examples, max_examples))
    for i, ex in enumerate(examples):
        if "inputs" not in ex or "targets" not in ex:
            raise ValueError(f"example {i} lacks 'inputs' or 'targets' (keys: {', '.join(map(str, ex))})")
    return examples, metric, split


# --- evaluation ----------------------------------------------------------------------------------

def encode_batch(tokenizer, texts: Sequence[str], max_input_len: int, pad_id: int, eos_id: int,
                 pad_to_multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) [B, W] int32, as scripts/infer.py builds them: EOS-terminated, inputs
    longer than max_input_len truncated (keeping the final EOS), right-padded to the longest row, rounded
    up to a multiple of `pad_to_multiple` (at most max_input_len) so batches share compiled shapes."""
    ids = [tokenizer.encode(t) for t in texts]
    ids = [x if len(x) <= max_input_len else x[:max_input_len - 1] + [eos_id] for x in ids]
    width = max(map(len, ids))
    if pad_to_multiple > 1:
        width = max(width, min(max_input_len, -(-width // pad_to_multiple) * pad_to_multiple))
    input_ids = np.array([x + [pad_id] * (width - len(x)) for x in ids], np.int32)
    mask = np.array([[1] * len(x) + [0] * (width - len(x)) for x in ids], np.int32)
    return input_ids, mask


def aggregate_stats(all_stats: Sequence) -> dict:
    """Engine figures over a run of batches: sums of new tokens, seconds, experts copied; rates from them."""
    d = [s.as_dict() for s in all_stats]
    new_tokens = sum(x["new_tokens"] for x in d)
    prefill_s = sum(x["prefill_s"] for x in d)
    decode_s = sum(x["decode_s"] for x in d)
    total_s = prefill_s + decode_s
    spec_hits = sum(x["speculative_hits"] or 0 for x in d)
    spec_needed = sum(x["speculative_needed"] or 0 for x in d)
    hits = [x["cache_hits"] for x in d if x["cache_hits"] is not None]
    misses = [x["cache_misses"] for x in d if x["cache_misses"] is not None]
    return {
        "mode": d[0]["mode"] if d else None,
        "batches": len(d),
        "new_tokens": new_tokens,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "total_s": total_s,
        "tokens_per_s": new_tokens / total_s if total_s else None,
        "decode_tokens_per_s": new_tokens / decode_s if decode_s else None,
        "experts_copied": sum(x["experts_copied"] for x in d),
        "bytes_moved": sum(x["bytes_moved"] for x in d),
        "speculative_hit_rate": spec_hits / spec_needed if spec_needed else None,
        "cache_hit_rate": (sum(hits) / (sum(hits) + sum(misses)) if hits and sum(hits) + sum(misses) else None),
        "note": "timings include JIT compilation (one per distinct batch shape)",
    }


def evaluate(model_or_engine, task: str | Iterable[dict], split: str | None = None, *,
             max_examples: int | None = None, batch_size: int = 8, max_input_len: int = 512,
             max_new_tokens: int = 32, num_beams: int = 1, mode: str | None = None, metric: str | None = None,
             tokenizer=None, data_dir: str | None = None, pad_to_multiple: int = 32,
             engine_options: dict | None = None, progress: bool = True) -> dict:
    """Generates for a task's examples with `InferenceEngine` and scores the decoded outputs.

    model_or_engine: a `SwitchTransformer` (switched to eval mode, then an engine is built in `mode`,
      default "pregated" for pre-gated models and "speculative" for conventional ones, with
      `engine_options` such as cache_policy=...) or a ready `InferenceEngine` (then `mode` must be None
      or match it; build it from a model in eval mode: one in training mode generates differently).
    task: a registered task name ("debian", "xsum", "squad", "web_questions"; split defaults to the
      task's `EVAL_SPLITS` entry) or an iterable of {"inputs", "targets"[, "answers"]} examples; for an
      iterable `metric` defaults to "qa" when the first example has "answers", else "rouge".
    tokenizer: a `Tokenizer`, a SentencePiece model path, or None for the bundled T5 vocabulary.
    pad_to_multiple: batch widths are rounded up to this multiple (at most max_input_len) so batches
      share compiled shapes; padding is masked, and with count-based capacity (`expert_capacity`) or
      dropless routing, pad tokens come last and cannot displace real ones. 1 pads to the longest row only.

    Returns {"metrics": {...}, "metric": kind, "predictions": [{"input", "target", "prediction"
    [, "answers"]}], "num_examples": N, "split": split, "stats": `aggregate_stats` of the batches}.
    """
    from pregated_jax.data.tokenizer import Tokenizer, default_tokenizer
    from pregated_jax.engine import InferenceEngine

    if batch_size <= 0 or max_input_len <= 1:
        raise ValueError(f"batch_size must be positive and max_input_len > 1, got {batch_size}, {max_input_len}")
    if metric is not None and metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    examples, task_metric, split = load_examples(task, split, max_examples, data_dir)
    metric = metric or task_metric or ("qa" if examples and "answers" in examples[0] else "rouge")

    if isinstance(model_or_engine, InferenceEngine):
        engine = model_or_engine
        if mode is not None and mode != engine.config.mode:
            raise ValueError(f"mode {mode!r} given with an engine built in mode {engine.config.mode!r}")
        if engine_options:
            raise ValueError("engine_options apply only when evaluate builds the engine from a model")
    else:
        cfg = model_or_engine.config
        mode = mode or ("pregated" if cfg.routing == "pregated" else "speculative")
        model_or_engine.eval()  # no dropout or router jitter (the engine snapshots the model as it is)
        engine = InferenceEngine(model_or_engine, mode=mode, **(engine_options or {}))
    cfg = engine.model_config
    if tokenizer is None:
        tokenizer = default_tokenizer()
    elif not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer(tokenizer)

    from tqdm import tqdm

    predictions, all_stats = [], []
    starts = range(0, len(examples), batch_size)
    for start in tqdm(starts, desc=f"evaluating ({metric})", unit="batch", file=sys.stderr,
                      disable=not progress or len(starts) < 2):
        chunk = examples[start:start + batch_size]
        input_ids, mask = encode_batch(tokenizer, [ex["inputs"] for ex in chunk], max_input_len,
                                       cfg.pad_token_id, cfg.eos_token_id, pad_to_multiple)
        res = engine.generate(input_ids, mask, max_new_tokens=max_new_tokens, num_beams=num_beams)
        all_stats.append(res.stats)
        for ex, text in zip(chunk, tokenizer.decode_batch(res.tokens.tolist())):
            record = {"input": ex["inputs"], "target": ex["targets"], "prediction": text}
            if metric == "qa":
                record["answers"] = list(ex.get("answers") or [ex["targets"]])
            predictions.append(record)

    return {
        "metric": metric,
        "metrics": score_predictions(predictions, metric),
        "predictions": predictions,
        "num_examples": len(predictions),
        "split": split,
        "stats": aggregate_stats(all_stats),
    }
