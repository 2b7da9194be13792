"""Example packing: the model on packed rows equals the model on the same examples unpacked (per token), the
grain pipeline's packing against a naive reference, seeded shuffling, and per-process shards."""

import itertools

import jax
import numpy as np
import pytest
from flax import nnx

from pregated_jax.config import get_preset
from pregated_jax.data import default_tokenizer
from pregated_jax.data.grain_pipeline import PACKING_KEYS, shard, state_worker_count, train_dataset
from pregated_jax.model import SwitchTransformer
from pregated_jax.train.loop import loss_and_metrics

LI, LT = 16, 8  # packed and unpacked rows have the same lengths, so the per-row expert capacity is the same


def random_examples(n: int, vocab: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """n (input ids, target ids) pairs of varied lengths, EOS (1) last, ids in [2, vocab) otherwise."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        li, lt = int(rng.integers(2, LI // 2 + 1)), int(rng.integers(1, LT // 2 + 1))
        inp = np.append(rng.integers(2, vocab, li - 1), 1).astype(np.int32)
        tgt = np.append(rng.integers(2, vocab, lt - 1), 1).astype(np.int32)
        out.append((inp, tgt))
    return out


def naive_unpacked(examples) -> dict:
    """One example per row, padded; decoder_input_ids = [0] + targets[:-1] (today's collate, written out)."""
    b = len(examples)
    batch = {k: np.zeros((b, n), np.int32) for k, n in (("input_ids", LI), ("attention_mask", LI),
                                                         ("decoder_input_ids", LT), ("labels", LT),
                                                         ("decoder_attention_mask", LT))}
    for row, (inp, tgt) in enumerate(examples):
        batch["input_ids"][row, :len(inp)] = inp
        batch["attention_mask"][row, :len(inp)] = 1
        batch["labels"][row, :len(tgt)] = tgt
        batch["decoder_attention_mask"][row, :len(tgt)] = 1
        batch["decoder_input_ids"][row, 1:len(tgt)] = tgt[:-1]
    return batch


def naive_packed(examples) -> tuple[dict, list[tuple[int, int, int]]]:
    """Examples placed in order, a new row when one side is full; -> (packed batch, [(row, input offset,
    target offset)] per example)."""
    rows, places = [[]], []
    used = [0, 0]
    for k, (inp, tgt) in enumerate(examples):
        if used[0] + len(inp) > LI or used[1] + len(tgt) > LT:
            rows.append([])
            used = [0, 0]
        places.append((len(rows) - 1, used[0], used[1]))
        rows[-1].append(k)
        used = [used[0] + len(inp), used[1] + len(tgt)]
    b = len(rows)
    keys = {"input_ids": LI, "attention_mask": LI, "decoder_input_ids": LT, "labels": LT,
            "decoder_attention_mask": LT, "encoder_segment_ids": LI, "encoder_positions": LI,
            "decoder_segment_ids": LT, "decoder_positions": LT}
    batch = {k: np.zeros((b, n), np.int32) for k, n in keys.items()}
    for k, (row, i0, t0) in enumerate(places):
        inp, tgt = examples[k]
        seg = rows[row].index(k) + 1
        batch["input_ids"][row, i0:i0 + len(inp)] = inp
        batch["attention_mask"][row, i0:i0 + len(inp)] = 1
        batch["encoder_segment_ids"][row, i0:i0 + len(inp)] = seg
        batch["encoder_positions"][row, i0:i0 + len(inp)] = np.arange(len(inp))
        batch["labels"][row, t0:t0 + len(tgt)] = tgt
        batch["decoder_attention_mask"][row, t0:t0 + len(tgt)] = 1
        batch["decoder_segment_ids"][row, t0:t0 + len(tgt)] = seg
        batch["decoder_positions"][row, t0:t0 + len(tgt)] = np.arange(len(tgt))
        batch["decoder_input_ids"][row, t0 + 1:t0 + len(tgt)] = tgt[:-1]  # each segment starts with 0
    return batch, places


MODELS = {
    "conventional-dropless": dict(routing="conventional", expert_capacity=None),
    "conventional-capacity2": dict(routing="conventional", num_experts=4, expert_capacity=2),
    "pregated-capacity2": dict(routing="pregated", num_experts=8, expert_capacity=2),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_packed_logits_and_loss_equal_unpacked(name):
    cfg = get_preset("tiny", **MODELS[name])
    model = SwitchTransformer(cfg, rngs=nnx.Rngs(1))
    model.eval()
    examples = random_examples(10, cfg.vocab_size)
    unpacked = naive_unpacked(examples)
    packed, places = naive_packed(examples)
    assert len(packed["input_ids"]) < len(examples) and packed["encoder_segment_ids"].max() >= 2

    @nnx.jit
    def forward(model, batch):
        packing = {k: batch[k] for k in PACKING_KEYS if k in batch}
        logits, aux = model(batch["input_ids"], batch["decoder_input_ids"], batch["attention_mask"],
                            batch["decoder_attention_mask"], return_aux=True, **packing)
        return logits, aux, loss_and_metrics(model, batch, cfg)[1]

    ref_logits, ref_aux, ref_m = jax.device_get(forward(model, unpacked))  # [N, LT, V]
    got_logits, got_aux, got_m = jax.device_get(forward(model, packed))  # [rows, LT, V]
    for k, (row, i0, t0) in enumerate(places):
        lt = len(examples[k][1])
        np.testing.assert_allclose(got_logits[row, t0:t0 + lt], ref_logits[k, :lt], rtol=1e-5, atol=1e-5,
                                   err_msg=f"example {k}")
    for key in ("ce_sum", "correct", "tokens"):
        np.testing.assert_allclose(got_m[key], ref_m[key], rtol=1e-5, err_msg=key)
    # Every real encoder token makes the same routing decisions (expert and capacity drop) in both layouts.
    for stack in ("encoder_decisions", "decoder_decisions"):
        for ref_d, got_d in zip(getattr(ref_aux, stack), getattr(got_aux, stack)):
            for k, (row, i0, t0) in enumerate(places):
                n, off = (len(examples[k][0]), i0) if stack == "encoder_decisions" else (len(examples[k][1]), t0)
                assert (got_d.expert_index[row, off:off + n] == ref_d.expert_index[k, :n]).all()
                assert (got_d.keep[row, off:off + n] == ref_d.keep[k, :n]).all()
    if MODELS[name]["expert_capacity"] is not None:  # the capacity really dropped tokens
        real = unpacked["attention_mask"].astype(bool)
        assert any((~d.keep & real).any() for d in ref_aux.encoder_decisions)


def test_partial_packing_arguments_are_refused():
    cfg = get_preset("tiny")
    model = SwitchTransformer(cfg, rngs=nnx.Rngs(0))
    packed, _ = naive_packed(random_examples(4, cfg.vocab_size))
    with pytest.raises(ValueError, match=r"missing \['decoder_positions'\]"):
        model(packed["input_ids"], packed["decoder_input_ids"], packed["attention_mask"],
              packed["decoder_attention_mask"], encoder_segment_ids=packed["encoder_segment_ids"],
              encoder_positions=packed["encoder_positions"], decoder_segment_ids=packed["decoder_segment_ids"])


# --- the grain pipeline --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


def id_examples(n: int, seed: int = 0) -> list[dict]:
    """Token-id examples (taken as is by the pipeline): example k's inputs start with id 100 + k."""
    rng = np.random.default_rng(seed)
    return [{"inputs": [100 + k] + rng.integers(2, 99, int(rng.integers(0, LI // 2))).tolist() + [1],
             "targets": [100 + k] + rng.integers(2, 99, int(rng.integers(0, LT // 2))).tolist() + [1]}
            for k in range(n)]


def segments_of(batch: dict) -> list[tuple[list, list]]:
    """(input ids, target ids) of every segment of a packed batch, checking each row's layout against a
    naive walk: segment ids 1, 2, ... in order on both sides, positions counting from 0, decoder inputs
    shifted within the segment, masks = segment ids > 0, padding zero."""
    out = []
    for row in range(batch["input_ids"].shape[0]):
        seg_i, seg_t = batch["encoder_segment_ids"][row], batch["decoder_segment_ids"][row]
        n = int(seg_i.max())
        assert int(seg_t.max()) == n and set(np.unique(seg_i)) - {0} == set(range(1, n + 1))
        np.testing.assert_array_equal(batch["attention_mask"][row], seg_i > 0)
        np.testing.assert_array_equal(batch["decoder_attention_mask"][row], seg_t > 0)
        assert (batch["input_ids"][row][seg_i == 0] == 0).all() and (batch["labels"][row][seg_t == 0] == 0).all()
        for s in range(1, n + 1):
            i_idx, t_idx = np.flatnonzero(seg_i == s), np.flatnonzero(seg_t == s)
            for idx in (i_idx, t_idx):  # contiguous
                assert (np.diff(idx) == 1).all()
            np.testing.assert_array_equal(batch["encoder_positions"][row, i_idx], np.arange(len(i_idx)))
            np.testing.assert_array_equal(batch["decoder_positions"][row, t_idx], np.arange(len(t_idx)))
            labels = batch["labels"][row, t_idx].tolist()
            assert batch["decoder_input_ids"][row, t_idx].tolist() == [0] + labels[:-1]
            out.append((batch["input_ids"][row, i_idx].tolist(), labels))
    return out


def test_packing_round_trip(tok):
    examples = id_examples(37)
    batches = list(train_dataset(examples, tok, 4, LI, LT, seed=None, pack=True, num_epochs=1))
    assert all(tuple(b)[:5] == ("input_ids", "attention_mask", "decoder_input_ids", "labels",
                                "decoder_attention_mask") and tuple(b)[5:] == PACKING_KEYS for b in batches)
    assert all(v.dtype == np.int32 and v.shape[1] == (LI if "encoder" in k or k in ("input_ids", "attention_mask")
                                                      else LT) for b in batches for k, v in b.items())
    segments = [s for b in batches for s in segments_of(b)]
    assert sorted(segments) == sorted((e["inputs"], e["targets"]) for e in examples)  # each exactly once
    rows = sum(len(b["input_ids"]) for b in batches)
    assert rows < len(examples)


def test_unpacked_batches_keep_the_collate_format(tok):
    from pregated_jax.data import batches as old_batches
    examples = id_examples(9)
    new = list(train_dataset(examples, tok, 4, LI, LT, seed=None, num_epochs=1))
    old = list(old_batches(examples, tok, 4, LI, LT))
    assert len(new) == len(old) == 3
    for a, b in zip(new, old):
        assert tuple(a) == tuple(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def firsts(ds, n: int) -> list[int]:
    """The example number (first input id - 100) of each row of the first n batches."""
    return [int(x) - 100 for b in itertools.islice(iter(ds), n) for x in b["input_ids"][:, 0]]


def test_shuffle_is_seeded_and_reshuffles_every_epoch(tok):
    examples = id_examples(12)
    a = firsts(train_dataset(examples, tok, 4, LI, LT, seed=3), 6)  # two epochs
    assert a == firsts(train_dataset(examples, tok, 4, LI, LT, seed=3), 6)
    assert a != firsts(train_dataset(examples, tok, 4, LI, LT, seed=4), 6)
    assert sorted(a[:12]) == sorted(a[12:]) == list(range(12)) and a[:12] != a[12:] and a[:12] != list(range(12))


def test_shards_are_disjoint_and_cover_the_source(tok):
    import grain
    ds = grain.MapDataset.source(list(range(11)))
    parts = [list(shard(ds, i, 3)) for i in range(3)]
    assert sorted(sum(parts, [])) == list(range(11)) and all(abs(len(p) - 11 / 3) < 1 for p in parts)
    examples = id_examples(10)
    seen = [sorted(firsts(train_dataset(examples, tok, 5, LI, LT, seed=0, num_epochs=1, shard_index=i,
                                        shard_count=2), 1)) for i in range(2)]
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(10))
    with pytest.raises(ValueError, match="shard_index must be in"):
        shard(ds, 3, 3)


def assert_resumes_at_the_next_batch(ds, taken: int, total: int, label: str) -> dict:
    """A fresh iterator over `ds` set to the state (through JSON, as the checkpoint stores it) after `taken`
    batches yields batches taken..total-1 of an uninterrupted run; -> that state."""
    import json

    it = iter(ds)
    full = [next(it) for _ in range(total)]
    it = iter(ds)
    for _ in range(taken):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    resumed = iter(ds)
    resumed.set_state(state)
    for want in full[taken:]:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{label} {k}")
    return state


def test_iterator_state_resumes_at_the_next_batch(tok):
    examples = id_examples(23)
    for pack in (False, True):
        assert_resumes_at_the_next_batch(train_dataset(examples, tok, 3, LI, LT, seed=1, pack=pack), 4, 9,
                                         f"pack={pack}")


def test_host_batch_keeps_all_packing_keys_or_refuses_a_partial_set():
    from pregated_jax.train.inputs import host_batch

    packed, _ = naive_packed(random_examples(4, 64))
    assert tuple(host_batch({**packed, "extra": 1}, 0)) == tuple(packed)  # BATCH_KEYS + PACKING_KEYS, extra dropped
    unpacked = naive_unpacked(random_examples(2, 64))
    assert not set(host_batch(unpacked, 0)) & set(PACKING_KEYS)
    with pytest.raises(KeyError, match="decoder_positions"):
        host_batch({k: v for k, v in packed.items() if k != "decoder_positions"}, 5)


@pytest.mark.slow  # starts worker processes (~20 s)
def test_worker_processes_give_every_example_once_per_epoch_and_resume(tok):
    """worker_count > 0 (grain's mp_prefetch): one epoch over two workers yields every example exactly once,
    and a saved state (through JSON, as the checkpoint stores it) resumes at the next batch, packed and
    unpacked."""
    examples = id_examples(23)
    for pack in (False, True):
        epoch = list(train_dataset(examples, tok, 3, LI, LT, seed=1, pack=pack, num_epochs=1, worker_count=2))
        got = [s for b in epoch for s in segments_of(b)] if pack else \
            [(b["input_ids"][r][b["attention_mask"][r] > 0].tolist(),
              b["labels"][r][b["decoder_attention_mask"][r] > 0].tolist())
             for b in epoch for r in range(len(b["input_ids"]))]
        assert sorted(got) == sorted((e["inputs"], e["targets"]) for e in examples), f"pack={pack}"

        ds = train_dataset(examples, tok, 3, LI, LT, seed=1, pack=pack, worker_count=2)
        assert state_worker_count(assert_resumes_at_the_next_batch(ds, 3, 8, f"pack={pack}, 2 workers")) == 2
    with pytest.raises(ValueError, match="worker_count must be >= 0"):
        train_dataset(examples, tok, 3, LI, LT, worker_count=-1)


def test_a_resume_with_another_worker_count_is_refused(tmp_path, tok):
    """The checkpoint's iterator state records its worker layout: restoring it into a run with another
    DataConfig.worker_count raises an error naming both counts (grain would fail deep inside, or silently
    resume at other examples), and the matching count restores."""
    import json

    import jax

    from pregated_jax.train.checkpoints import CheckpointStore

    it = iter(train_dataset(id_examples(9), tok, 3, LI, LT, seed=1))
    next(it)
    state = it.get_state()
    assert state_worker_count(state) == 0
    folder = tmp_path / "ckpt" / "7" / "data"
    folder.mkdir(parents=True)
    (folder / f"process_{jax.process_index()}-of-{jax.process_count()}.json").write_text(json.dumps(state))
    store = CheckpointStore(tmp_path / "ckpt", keep=1, async_save=False)
    try:
        with pytest.raises(ValueError, match=r"saved with DataConfig.worker_count=0, but this run has "
                                             r"worker_count=4: resume with worker_count=0"):
            store.restore_data_state(7, iter(train_dataset(id_examples(9), tok, 3, LI, LT, seed=1)), 4)
        fresh = iter(train_dataset(id_examples(9), tok, 3, LI, LT, seed=1))
        store.restore_data_state(7, fresh, 0)
        assert fresh.get_state() == state
    finally:
        store.close()
