"""Tests of the data layer: tokenizer, sources, batching, span corruption (fast, CPU, offline)."""

import gzip
import json
import sys

import numpy as np
import pytest

from pregated_jax import data
from pregated_jax.data import pretraining as sc

T5_EXAMPLE = "translate English to German: The house is wonderful."
T5_EXAMPLE_IDS = [13959, 1566, 12, 2968, 10, 37, 629, 19, 1627, 5]


@pytest.fixture(scope="module")
def tok():
    return data.default_tokenizer()


# --- tokenizer -----------------------------------------------------------------------------------

def test_tokenizer_t5_ids(tok):
    assert tok.encode(T5_EXAMPLE) == T5_EXAMPLE_IDS + [1]
    assert tok.encode(T5_EXAMPLE, add_eos=False) == T5_EXAMPLE_IDS
    assert (tok.pad_id, tok.eos_id, tok.piece_count, tok.vocab_size) == (0, 1, 32000, 32100)
    assert tok.sentinel_id(0) == 32099 and tok.sentinel_id(99) == 32000


def test_tokenizer_decode(tok):
    text = "Pre-gated MoE moves experts while the previous block computes."
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids + [0, 0]) == text                       # padding skipped
    assert tok.decode(ids[:3] + [0] + ids[3:]) == text            # pad anywhere skipped
    assert tok.decode(ids + tok.encode("ignored after EOS")) == text
    assert tok.decode(np.array([37, 32099, 629, 32127, 1, 5])) == "The <extra_id_0> house"
    assert tok.decode_batch(np.array([ids, ids])) == [text, text]


def test_tokenizer_bad_model_file(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match="nope.model"):
        data.Tokenizer(missing)
    corrupt = tmp_path / "corrupt.model"
    corrupt.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(ValueError, match="corrupt.model"):
        data.Tokenizer(corrupt)


# --- sources -------------------------------------------------------------------------------------

def test_debian_source():
    source, metric = data.get_task("debian")
    assert metric == "rouge"
    examples = list(source("validation"))
    assert len(examples) == data.DEBIAN_SPLIT_SIZES["validation"] == 2628
    assert data.count_examples("debian", "train") == 49050
    for ex in examples[:20]:
        assert ex["inputs"].startswith("summarize: ") and len(ex["inputs"]) > len("summarize: ") + 10
        assert ex["targets"].strip()
    assert examples[1]["targets"] == "convert an addressbook to VCARD file format"
    with pytest.raises(ValueError, match="split"):
        data.debian_source("test")


def test_task_registry():
    assert {n: data.get_task(n).metric for n in ("debian", "xsum", "squad", "web_questions")} == {
        "debian": "rouge", "xsum": "rouge", "squad": "qa", "web_questions": "qa"}
    assert data.EVAL_SPLITS["web_questions"] == "test"
    with pytest.raises(ValueError, match="debian"):
        data.get_task("cnn")


def _write_jsonl(path, records, gz=False):
    text = "".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in records)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")


def test_local_source_jsonl_and_tsv(tmp_path):
    records = [{"q": "Wer ist da?", "a": "ich", "n": 1}, {"q": "naïve ✓", "a": "ja", "n": 2}]
    expected = [{"inputs": "question: Wer ist da?", "targets": "ich"},
                {"inputs": "question: naïve ✓", "targets": "ja"}]
    plain, gz, tsv = tmp_path / "d.jsonl", tmp_path / "d.jsonl.gz", tmp_path / "d.tsv"
    _write_jsonl(plain, records[:1] + ["\n"] + records[1:])    # blank lines are skipped
    _write_jsonl(gz, records, gz=True)
    tsv.write_text("n\tq\ta\n1\tWer ist da?\tich\n2\tnaïve ✓\tja\n", encoding="utf-8")
    for path in (plain, gz, tsv):
        assert list(data.local_source(path, "q", "a", prefix="question: ")) == expected, path
    assert next(iter(data.local_source(tsv, "n", "a")))["inputs"] == "1"  # TSV cells are text
    with pytest.raises(ValueError, match=rf"{plain}, line 1: field 'n' is 1 \(a number\); it must be a string"):
        next(iter(data.local_source(plain, "n", "a")))  # a JSON number is not text (str() would hide a null)


def test_local_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        data.local_source(tmp_path / "missing.jsonl", "q", "a")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": "x", "a": "y"}\n{"q": "x", "a": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: malformed JSON"):
        list(data.local_source(bad, "q", "a"))
    nofield = tmp_path / "nofield.jsonl"
    _write_jsonl(nofield, [{"q": "x", "a": "y"}, {"q": "x", "answer": "y"}])
    with pytest.raises(KeyError) as info:
        list(data.local_source(nofield, "q", "a"))
    msg = str(info.value)
    assert "nofield.jsonl" in msg and "line 2" in msg and "'a'" in msg and "q, answer" in msg
    tsv = tmp_path / "t.tsv"
    tsv.write_text("q\tanswer\nx\ty\n", encoding="utf-8")
    with pytest.raises(data.MissingFieldError,
                       match=r"t\.tsv, line 2: field 'a' not present; fields there: q, answer"):
        list(data.local_source(tsv, "q", "a"))
    ragged = tmp_path / "r.tsv"
    ragged.write_text("q\ta\nx\ty\tz\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"r\.tsv, line 2: 3 tab-separated columns"):
        list(data.local_source(ragged, "q", "a"))
    with pytest.raises(ValueError, match="unsupported"):
        (tmp_path / "x.csv").write_text("q,a\n")
        data.local_source(tmp_path / "x.csv", "q", "a")


def test_tfds_source_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # makes `import tensorflow` raise ImportError
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match="pip install tensorflow-datasets"):
        data.tfds_source("xsum", "validation")


def test_tfds_source_with_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with pytest.raises(FileNotFoundError, match="tfds build squad/v1.1 --data_dir"):
        data.tfds_source("squad", "validation", data_dir=str(tmp_path))
    with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
        xsum = list(data.tfds_source("xsum", "validation"))
        squad = list(data.get_task("squad").source("train"))
        webq = list(data.tfds_source("web_questions", "test"))
    assert len(xsum) == len(squad) == len(webq) == 3
    assert all(ex["inputs"].startswith("summarize: ") and isinstance(ex["targets"], str) for ex in xsum)
    for ex in squad:
        assert ex["inputs"].startswith("question: ") and " context: " in ex["inputs"]
        assert ex["targets"] == (ex["answers"][0] if ex["answers"] else "")
    for ex in webq:
        assert ex["inputs"].startswith("question: ")
        assert ex["targets"] == (ex["answers"][0] if ex["answers"] else "")


# --- batching ------------------------------------------------------------------------------------

def test_batches_hand_built(tok):
    examples = [{"inputs": [5, 6, 7, 1], "targets": [8, 9, 1]},     # token ids are taken as is
                {"inputs": [5, 6, 7, 8, 9, 10, 1], "targets": [11, 12, 13, 14, 1]},  # both too long
                {"inputs": "The house", "targets": "wonderful"}]
    (batch,) = list(data.batches(examples, tok, batch_size=3, max_input_len=5, max_target_len=4))
    assert tuple(batch) == data.BATCH_KEYS
    assert all(v.dtype == np.int32 for v in batch.values())
    the_house, wonderful = tok.encode("The house"), tok.encode("wonderful")
    np.testing.assert_array_equal(batch["input_ids"], [[5, 6, 7, 1, 0], [5, 6, 7, 8, 1],
                                                       the_house + [0] * (5 - len(the_house))])
    np.testing.assert_array_equal(batch["attention_mask"], [
        [1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1] * len(the_house) + [0] * (5 - len(the_house))])
    np.testing.assert_array_equal(batch["labels"], [[8, 9, 1, 0], [11, 12, 13, 1],
                                                    wonderful + [0] * (4 - len(wonderful))])
    np.testing.assert_array_equal(batch["decoder_input_ids"], [[0, 8, 9, 1], [0, 11, 12, 13],
                                                               [0] + wonderful + [0] * (3 - len(wonderful))])
    np.testing.assert_array_equal(batch["decoder_attention_mask"], [
        [1, 1, 1, 0], [1, 1, 1, 1], [1] * len(wonderful) + [0] * (4 - len(wonderful))])


def test_batches_order_shuffle_repeat(tok):
    examples = [{"inputs": [i + 2, 1], "targets": [i + 2, 1]} for i in range(10)]

    def firsts(it, n=None):
        out = []
        for k, b in enumerate(it):
            if n is not None and k == n:
                break
            out.append(b["input_ids"][:, 0].tolist())
        return out

    kw = dict(tokenizer=tok, batch_size=4, max_input_len=3, max_target_len=3)
    assert firsts(data.batches(iter(examples), **kw)) == [[2, 3, 4, 5], [6, 7, 8, 9], [10, 11]]
    assert firsts(data.batches(examples, drop_remainder=True, **kw)) == [[2, 3, 4, 5], [6, 7, 8, 9]]
    a = firsts(data.batches(examples, shuffle_seed=3, **kw))
    assert a == firsts(data.batches(examples, shuffle_seed=3, **kw))           # deterministic
    assert a != firsts(data.batches(examples, shuffle_seed=4, **kw))
    assert sorted(sum(a, [])) == list(range(2, 12))                             # a permutation
    rep = firsts(data.batches(examples, shuffle_seed=3, repeat=True, **kw), n=5)  # 20 = two epochs
    assert all(len(r) == 4 for r in rep)
    flat = sum(rep, [])
    assert sorted(flat[:10]) == sorted(flat[10:]) == list(range(2, 12)) and flat[:10] != flat[10:]
    batch, exs = next(data.batches(examples, return_examples=True, **kw))
    assert exs == examples[:4] and batch["input_ids"].shape == (4, 3)


def test_batches_debian_smoke(tok):
    source, _ = data.get_task("debian")
    batch = next(data.batches(source("validation"), tok, 8, 128, 32, shuffle_seed=0))
    assert batch["input_ids"].shape == (8, 128) and batch["labels"].shape == (8, 32)
    lengths = batch["attention_mask"].sum(1)
    assert (batch["input_ids"][np.arange(8), lengths - 1] == 1).all()       # EOS last, also when truncated
    assert tok.decode(batch["input_ids"][0]).startswith("summarize: ")


# --- span corruption -----------------------------------------------------------------------------

def test_span_corruption_hand_worked():
    tokens = [10, 11, 12, 13, 14, 15, 16, 17]                  # a b c d e f g h
    mask = [0, 0, 1, 1, 0, 0, 1, 0]                            # noise: c d, g
    inputs, targets = data.span_corruption(tokens, noise_mask=mask)
    assert inputs.tolist() == [10, 11, 32099, 14, 15, 32098, 17, 1]       # a b <S0> e f <S1> h </s>
    assert targets.tolist() == [32099, 12, 13, 32098, 16, 32097, 1]       # <S0> c d <S1> g <S2> </s>
    # Starting with noise and ending with noise; a trailing EOS in the input is dropped first.
    inputs, targets = data.span_corruption(tokens + [1], noise_mask=[1, 0, 0, 0, 1, 1, 0, 1])
    assert inputs.tolist() == [32099, 11, 12, 13, 32098, 16, 32097, 1]
    assert targets.tolist() == [32099, 10, 32098, 14, 15, 32097, 17, 1]
    inputs, targets = data.span_corruption(tokens, noise_mask=[0, 1, 0, 0, 0, 0, 0, 0], add_eos=False,
                                           sentinel_start=99)
    assert inputs.tolist() == [10, 99, 12, 13, 14, 15, 16, 17] and targets.tolist() == [99, 11, 98]


def test_random_spans_noise_mask_statistics():
    rng = np.random.default_rng(0)
    for length in (2, 7, 100, 568):
        mask = sc.random_spans_noise_mask(length, 0.15, 3.0, rng)
        num_noise = int(np.clip(round(length * 0.15), 1, length - 1))
        assert mask.shape == (length,) and mask.sum() == num_noise
        assert not mask[0] and mask[-1]                        # T5: starts non-noise, ends with noise
        spans = int((mask & ~np.concatenate([[False], mask[:-1]])).sum())
        assert spans == max(round(num_noise / 3.0), 1)
    np.testing.assert_array_equal(sc.random_spans_noise_mask(100, rng=5),
                                  sc.random_spans_noise_mask(100, rng=5))


def test_span_corruption_lengths_and_examples(tok):
    assert data.span_corruption_lengths(512) == (568, 114)     # T5's numbers
    tokens_length, targets_length = data.span_corruption_lengths(64)
    texts = [ex["targets"] + ". " + ex["inputs"][len("summarize: "):]
             for ex in data.debian_source("validation")]
    examples = list(data.span_corruption_examples(texts[:40], tok, inputs_length=64, seed=0))
    assert len(examples) > 10
    for ex in examples[:-1]:
        assert len(ex["inputs"]) == 64 and len(ex["targets"]) == targets_length
        assert ex["inputs"][-1] == 1 and ex["targets"][-1] == 1 and ex["targets"][0] == 32099
    # Undo the corruption: sentinels in the inputs, filled from the targets, give back the chunk.
    ex = examples[0]
    spans, cur = {}, None
    for t in ex["targets"][:-1]:
        if t >= 32000:
            cur = int(t)
            spans[cur] = []
        else:
            spans[cur].append(int(t))
    restored = [x for t in ex["inputs"][:-1] for x in (spans[int(t)] if t >= 32000 else [int(t)])]
    stream = [i for text in texts[:40] for i in tok.encode(text, add_eos=False)]
    assert restored == stream[:tokens_length]
    batch = next(data.batches(examples, tok, 4, 64, targets_length))
    assert batch["attention_mask"].all() and batch["decoder_attention_mask"].all()


# --- grain sources -------------------------------------------------------------------------------

def test_grain_sources_match_the_iterable_sources(tmp_path):
    from pregated_jax.data.sources import grain_source, local_grain_source

    debian = grain_source("debian", "validation")
    assert len(debian) == data.DEBIAN_SPLIT_SIZES["validation"]
    assert [debian[i] for i in (0, 1, 2628 - 1)] == [ex for i, ex in enumerate(data.debian_source("validation"))
                                                      if i in (0, 1, 2628 - 1)]
    path = tmp_path / "d.tsv"
    path.write_text("q\ta\nfirst\tone\nsecond\ttwo\n")
    assert list(local_grain_source(path, "q", "a", prefix="p: ")) == list(data.local_source(path, "q", "a", "p: "))


def test_tfds_grain_source_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    from pregated_jax.data.sources import grain_source

    with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
        squad = list(grain_source("squad", "train"))  # the mock's random-access data differs from its tfds.load data
        webq = list(grain_source("web_questions", "test"))
    assert len(squad) == len(webq) == 3
    for ex in squad:
        assert ex["inputs"].startswith("question: ") and " context: " in ex["inputs"]
        assert ex["targets"] == (ex["answers"][0] if ex["answers"] else "")
    assert all(ex["inputs"].startswith("question: ") and isinstance(ex["targets"], str) for ex in webq)
