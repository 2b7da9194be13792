"""Evaluation: ROUGE and SQuAD EM/F1 on hand-computed examples, `evaluate` end to end, scripts/evaluate.py."""

import dataclasses
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from pregated_jax import EngineConfig, InferenceEngine, SwitchTransformer, get_preset, save_pretrained
from pregated_jax.data import local_source
from pregated_jax.data.tokenizer import default_tokenizer
from pregated_jax.evaluation import (
    encode_batch, evaluate, exact_match_score, f1_score, normalize_answer, rouge_scores, score_predictions,
    squad_scores)

ROOT = Path(__file__).resolve().parents[1]
TARGET = "the cat sat on the mat"


# --- ROUGE ---------------------------------------------------------------------------------------

def test_rouge_hand_computed():
    # "the cat sat": unigrams 3/3 in the target (recall 3/6) -> F = 2*1*0.5/1.5; bigrams "the cat",
    # "cat sat" both in the target's 5 -> F = 2*1*0.4/1.4; LCS 3 -> as ROUGE-1.
    s = rouge_scores(["the cat sat"], [TARGET])
    assert s["rouge1"] == pytest.approx(200 / 3)
    assert s["rouge2"] == pytest.approx(100 * 0.8 / 1.4)
    assert s["rougeL"] == pytest.approx(200 / 3)
    # "the mat sat": unigrams the, mat, sat -> 3/3, 3/6; bigrams: only "the mat" -> 1/2, 1/5 -> F = 2/7;
    # LCS "the mat" (or "the sat") = 2 -> P 2/3, R 2/6 -> F = 4/9.
    s = rouge_scores(["the mat sat"], [TARGET])
    assert s["rouge1"] == pytest.approx(200 / 3)
    assert s["rouge2"] == pytest.approx(100 * 2 / 7)
    assert s["rougeL"] == pytest.approx(100 * 4 / 9)
    # averaged over examples
    s = rouge_scores(["the cat sat", "the mat sat"], [TARGET, TARGET])
    assert s == pytest.approx({"rouge1": 200 / 3, "rouge2": 100 * 3 / 7, "rougeL": 100 * 5 / 9})


def test_rouge_tokenization_case_punctuation_stemming():
    assert rouge_scores(["The cats sat."], ["the cat sat"]) == pytest.approx(
        {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0})
    assert rouge_scores(["dog"], ["the cat"]) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    with pytest.raises(ValueError, match="2 predictions but 1"):
        rouge_scores(["a", "b"], ["a"])


# --- SQuAD ---------------------------------------------------------------------------------------

def test_squad_normalization():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("an apple a day, the end.") == "apple day end"
    assert normalize_answer("theater") == "theater"  # articles only as whole words
    assert normalize_answer("Paris-France") == "parisfrance"  # punctuation removed, not replaced by spaces
    assert normalize_answer("A") == ""


def test_squad_exact_match_and_f1():
    assert exact_match_score("the Eiffel Tower.", "Eiffel tower") == 1.0
    assert exact_match_score("Eiffel Tower in Paris", "the Eiffel Tower") == 0.0
    # 2 common tokens; precision 2/4, recall 2/2 -> F1 = 2 * 0.5 * 1 / 1.5
    assert f1_score("Eiffel Tower in Paris", "the Eiffel Tower") == pytest.approx(2 / 3)
    # counts are clipped: "to to be" vs "to be" -> 2 common, P 2/3, R 1 -> 0.8
    assert f1_score("to to be", "to be") == pytest.approx(0.8)
    assert f1_score("London", "Paris") == 0.0
    assert f1_score("the", "a") == 0.0  # both empty after normalization: 0 as in the official script


def test_squad_max_over_golds_and_average():
    # example 1: EM 1 (matches the second gold); example 2: EM 0, F1 max(2/3 vs "paris france", 0 vs "lyon")
    s = squad_scores(["Paris", "France"], [["Paris, France", "paris"], ["Paris, France", "Lyon"]])
    assert s["exact_match"] == pytest.approx(50.0)
    assert s["f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert squad_scores(["x"], ["x"]) == {"exact_match": 100.0, "f1": 100.0}  # a bare string is one gold
    with pytest.raises(ValueError, match="no gold answers"):
        squad_scores(["x"], [[]])


# --- evaluate end to end ---------------------------------------------------------------------------

EXAMPLES = [
    {"document": "a tool that converts address books between formats", "summary": "address book converter"},
    {"document": "x", "summary": "x"},
    {"document": "library for reading and writing compressed archives in many formats", "summary": "archive library"},
    {"document": "fonts", "summary": "a font"},
    {"document": "daemon that watches the network and reports outages by email", "summary": "network monitor"},
]


@pytest.fixture(scope="module")
def model():
    m = SwitchTransformer(get_preset("tiny", vocab_size=32128, routing="pregated"), rngs=nnx.Rngs(0))
    m.eval()
    return m


@pytest.fixture(scope="module")
def engine(model):
    return InferenceEngine(model, mode="pregated")


@pytest.fixture()
def data_file(tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    return path


def test_evaluate_matches_engine_and_metric(model, engine, data_file):
    tok = default_tokenizer()
    result = evaluate(engine, local_source(data_file, "document", "summary", prefix="summarize: "),
                      max_examples=4, batch_size=3, max_new_tokens=4, progress=False)
    assert result["metric"] == "rouge" and result["num_examples"] == 4
    preds = result["predictions"]
    assert [p["input"] for p in preds] == ["summarize: " + e["document"] for e in EXAMPLES[:4]]
    assert [p["target"] for p in preds] == [e["summary"] for e in EXAMPLES[:4]]
    # Each prediction is the engine's greedy tokens for that input alone (batch 1, padded to the same
    # width 32 as evaluate's batches, so no new compilation), decoded.
    for p in preds:
        ids = tok.encode(p["input"])
        input_ids = np.zeros((1, 32), np.int32)
        input_ids[0, :len(ids)] = ids
        tokens = engine.generate(input_ids, (input_ids != 0).astype(np.int32), max_new_tokens=4).tokens
        assert p["prediction"] == tok.decode(tokens[0].tolist())
    assert any(p["prediction"] for p in preds)
    # The scores are the metric of those predictions, recomputed with rouge_score directly.
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    per = [scorer.score(p["target"], p["prediction"]) for p in preds]
    for k in ("rouge1", "rouge2", "rougeL"):
        assert result["metrics"][k] == pytest.approx(100 * np.mean([s[k].fmeasure for s in per]))
    stats = result["stats"]
    assert stats["batches"] == 2 and stats["new_tokens"] == 4 * 4 and stats["mode"] == "pregated"
    assert stats["total_s"] == pytest.approx(stats["prefill_s"] + stats["decode_s"])
    assert stats["tokens_per_s"] == pytest.approx(16 / stats["total_s"])

    # QA scoring, from the model (evaluate builds its engine), on examples whose gold answers are (for
    # even i) the model's own output: exact match is 100 there, so predictions meet their own example.
    qa = [{"inputs": p["input"], "targets": "zzz", "answers": ["zzz", p["prediction"]] if i % 2 == 0 else ["zzz"]}
          for i, p in enumerate(preds)]
    res = evaluate(model, qa, batch_size=4, max_new_tokens=4, progress=False)
    assert res["metric"] == "qa" and res["stats"]["batches"] == 1
    assert [p["prediction"] for p in res["predictions"]] == [p["prediction"] for p in preds]
    assert [p["answers"] for p in res["predictions"]] == [q["answers"] for q in qa]
    expected_em = [100.0 * (i % 2 == 0 or normalize_answer(p["prediction"]) == "zzz") for i, p in enumerate(preds)]
    assert res["metrics"]["exact_match"] == pytest.approx(np.mean(expected_em))
    assert res["metrics"]["f1"] == pytest.approx(100 * np.mean(
        [max(f1_score(p["prediction"], g) for g in q["answers"]) for p, q in zip(preds, qa)]))
    assert res["metrics"] == pytest.approx(score_predictions(res["predictions"], "qa"))


def test_evaluate_rejects_bad_arguments(engine):
    with pytest.raises(ValueError, match="unknown task"):
        evaluate(engine, "nope")
    with pytest.raises(ValueError, match="mode 'on-demand'"):
        evaluate(engine, [{"inputs": "a", "targets": "b"}], mode="on-demand")
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate(engine, [{"inputs": "a", "targets": "b"}], metric="bleu")


def test_encode_batch_truncates_and_pads():
    tok = default_tokenizer()
    ids, mask = encode_batch(tok, ["one two three four five six seven", "x"], max_input_len=4, pad_id=0, eos_id=1,
                             pad_to_multiple=32)
    assert ids.shape == (2, 4) and ids[0, -1] == 1 and mask[0].tolist() == [1, 1, 1, 1]
    ids, mask = encode_batch(tok, ["x"], max_input_len=512, pad_id=0, eos_id=1, pad_to_multiple=32)
    n = len(tok.encode("x"))
    assert ids.shape == (1, 32) and mask.sum() == n and ids[0, :n].tolist() == tok.encode("x")


# --- scripts/evaluate.py ---------------------------------------------------------------------------

@pytest.fixture
def evaluate_script(monkeypatch):
    """scripts/evaluate.py as a module; the process settings its main() makes are undone after the test."""
    for name in ("XLA_FLAGS", "CUDA_MODULE_LOADING"):
        monkeypatch.delenv(name, raising=False)
    spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "scripts" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_writes_predictions_and_scores(evaluate_script, model, data_file, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    save_pretrained(model, ckpt)
    work = tmp_path / "eval"
    scores = evaluate_script.main(["--checkpoint", str(ckpt), "--data_file", str(data_file), "--input_field",
                                   "document", "--target_field", "summary", "--metric", "qa", "--max_examples", "3",
                                   "--batch_size", "2", "--max_new_tokens", "3", "--copy_method", "xla",
                                   "--workdir", str(work)])
    lines = (work / "predictions.jsonl").read_text().splitlines()
    preds = [json.loads(line) for line in lines]
    assert len(preds) == 3 and [p["target"] for p in preds] == [e["summary"] for e in EXAMPLES[:3]]
    on_disk = json.loads((work / "scores.json").read_text())
    assert on_disk["metrics"] == scores["metrics"] and on_disk["num_examples"] == 3
    assert on_disk["metrics"] == pytest.approx(squad_scores([p["prediction"] for p in preds],
                                                            [[p["target"]] for p in preds]))
    assert on_disk["stats"]["new_tokens"] == 9 and on_disk["settings"]["mode"] == "pregated"
    assert on_disk["settings"]["engine"] == dict(dataclasses.asdict(EngineConfig()), copy_method="xla")
    assert not [p for p in work.iterdir() if p.name.endswith(".tmp")]
    assert "exact_match" in capsys.readouterr().out


def test_script_errors(evaluate_script, data_file, tmp_path, capsys):
    script = evaluate_script
    with pytest.raises(SystemExit, match="does_not_exist"):
        script.main(["--checkpoint", "/tmp/does_not_exist", "--data_file", str(data_file), "--input_field",
                     "document", "--target_field", "summary", "--workdir", str(tmp_path)])
    with pytest.raises(SystemExit, match="'headline' not present"):
        script.main(["--data_file", str(data_file), "--input_field", "document", "--target_field", "headline",
                     "--workdir", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        script.main(["--task", "nope", "--workdir", str(tmp_path)])
    assert e.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err


def test_script_turns_a_request_refused_for_memory_into_one_error_line(evaluate_script, data_file, tmp_path,
                                                                      monkeypatch):
    from pregated_jax import memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: (1000, "test figure"))
    with pytest.raises(SystemExit) as e:
        evaluate_script.main(["--data_file", str(data_file), "--input_field", "document", "--target_field",
                              "summary", "--max_examples", "2", "--workdir", str(tmp_path / "w")])
    message = e.value.code  # a string: Python prints it to stderr and exits with status 1
    assert isinstance(message, str) and "\n" not in message
    assert re.match(r"error: this request \(batch 2, .*needs about .* but only .*1000 bytes\) is available "
                    r"\(test figure\)", message)
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("value, shown", [(None, "null"), (3, "3 (a number)"), (["a", "b"], '["a", "b"] (an array)')])
def test_script_rejects_a_non_string_field_naming_file_and_line(evaluate_script, data_file, tmp_path, value, shown):
    """A null / number / list target (or input) is refused, not scored as its str() ("None", "3")."""
    bad = tmp_path / "bad.jsonl"
    rows = [{"document": "a b c", "summary": "a"}, {"document": "d e f", "summary": value}]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit, match=rf"^error: {re.escape(str(bad))}, line 2: field 'summary' is "
                                         rf"{re.escape(shown)}.*must be a string$"):
        evaluate_script.main(["--data_file", str(bad), "--input_field", "document", "--target_field", "summary",
                              "--workdir", str(tmp_path / "w")])
    with pytest.raises(ValueError, match=r"line 1: field 'document' is null"):
        list(local_source(_jsonl(tmp_path / "in.jsonl", [{"document": None, "summary": "x"}]), "document", "summary"))


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("flag", ["--max_input_len", "--pad_to_multiple"])
def test_script_rejects_zero_lengths(evaluate_script, data_file, tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as e:
        evaluate_script.main(["--data_file", str(data_file), "--input_field", "document", "--target_field", "summary",
                              flag, "0", "--workdir", str(tmp_path)])
    assert e.value.code == 2 and f"error: {flag} must be >= 1, got 0" in capsys.readouterr().err
