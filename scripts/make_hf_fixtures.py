"""Builds the Hugging Face parity fixtures under tests/fixtures/hf/<name>/.

Each fixture is a tiny, seeded, random `SwitchTransformersForConditionalGeneration` (torch, CPU, float32)
saved by HF itself (`save_pretrained`, which in transformers 5 writes config.json + model.safetensors),
plus `expected.npz` holding the inputs and what HF computes from them in eval mode:

    input_ids, attention_mask, decoder_input_ids, decoder_attention_mask   the inputs (int64)
    logits                                  [B, T, V] float32, `output_router_logits=True`
    encoder_z_loss, encoder_aux_loss, decoder_z_loss, decoder_aux_loss      float32 scalars (HF reports
                                            0 for a stack whose sparse step is 1, see below)
    encoder_router_logits, decoder_router_logits   [B, S * n_sparse, E] the raw router logits of the
                                            stack's sparse layers, concatenated along the sequence
    greedy                                  `model.generate(input_ids, attention_mask=...,
                                            max_new_tokens=N, do_sample=False, num_beams=1)`, the full
                                            output including the decoder start token (may be shorter
                                            than N + 1 when every row hit EOS)
    max_new_tokens                          N

Fixtures (each exercises one part of HF's semantics):
    base_like  4 experts, 4 heads, 4+4 blocks, sparse step 2, capacity 64 (nothing dropped), no padding
    asym       3 encoder / 6 decoder blocks, 8 experts, 2 heads; encoder all sparse (step 1), decoder
               step 3; 10 buckets, max distance 24
    drops      expert_capacity 2 with 12-token sequences: tokens are dropped (asserted) in both stacks
    padded     batch 3 of different lengths: zeros in attention_mask and decoder_attention_mask; EOS is
               a token that greedy decoding reaches in one row only (pad after EOS)
    buckets    16 buckets, max distance 20, sequences of 48/40 tokens (log buckets and the clamp) and
               untied word embeddings (`tie_word_embeddings=False`, own lm_head, no output rescale);
               every row reaches EOS early, so HF's greedy output is shorter than max_new_tokens + 1

Random HF weights: the router classifiers are redrawn with a larger scale (std 2) so that routing is
sharp and uses several experts, and the sublayer output projections are scaled by 3 so that greedy
decoding does not just repeat one token; the script asserts that every sparse layer routes to >= 2 experts and
that no router or greedy decision sits on a near-tie (which float32 noise could flip).

HF's router losses: `SwitchTransformersForConditionalGeneration.forward` computes a stack's losses only
when its sparse step is > 1, so a stack whose every block is sparse (`asym` encoder) gets 0 (transformers
5.23); the router logits above let a test compute the real losses.

Generation: transformers 5.23 sizes the decoder cache that `generate` builds from `num_layers`, which
fails when the decoder is deeper than the encoder (`asym`); a config-less cache is passed instead.

Untied embeddings: transformers 5.x unties `encoder.embed_tokens`/`decoder.embed_tokens` from `shared`
when `tie_word_embeddings=False` (transformers 4.x always shared them). The `buckets` fixture copies
`shared` into both so that the checkpoint has one input embedding, as every real checkpoint does.

Usage: python scripts/make_hf_fixtures.py [--out tests/fixtures/hf]
Deterministic: same torch/transformers versions give the same files.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
from typing import Any

import numpy as np
import torch
from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

ROUTER_STD = 2.0  # HF initializes router classifiers with std 1
# HF's init makes the residual stream mostly the token embedding, so greedy decoding repeats one token;
# larger sublayer outputs (attention `o`, FFN/expert `wo`) give varied greedy sequences.
SUBLAYER_GAIN = 3.0
MIN_MARGIN = 1e-3  # smallest allowed gap between the best and second-best router logit / greedy logit


@dataclasses.dataclass
class Fixture:
    name: str
    seed: int
    config: dict[str, Any]
    batch: int = 2
    enc_len: int = 12
    dec_len: int = 7
    enc_lengths: tuple[int, ...] | None = None  # real tokens per row (rest is padding); None: no padding
    dec_lengths: tuple[int, ...] | None = None
    max_new_tokens: int = 8
    must_drop: bool = False
    # EOS checks on the greedy output: some rows end early / every row ends before max_new_tokens.
    some_rows_end: bool = False
    all_rows_end: bool = False


COMMON = dict(vocab_size=64, d_model=24, d_kv=6, d_ff=32, num_heads=4, num_layers=4, num_decoder_layers=4,
              num_sparse_encoder_layers=2, num_sparse_decoder_layers=2, num_experts=4, expert_capacity=64,
              pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)

FIXTURES = [
    Fixture("base_like", seed=11, config=dict(COMMON)),
    Fixture("asym", seed=12, config=dict(
        COMMON, d_model=16, d_kv=8, d_ff=24, num_heads=2, num_layers=3, num_decoder_layers=6,
        num_sparse_encoder_layers=3, num_sparse_decoder_layers=2, num_experts=8,
        relative_attention_num_buckets=10, relative_attention_max_distance=24), enc_len=10, dec_len=9),
    Fixture("drops", seed=13, config=dict(COMMON, expert_capacity=2), enc_len=12, dec_len=12,
            must_drop=True),
    Fixture("padded", seed=14, config=dict(COMMON, vocab_size=80, eos_token_id=54), batch=3, enc_len=11,
            dec_len=8, enc_lengths=(11, 6, 3), dec_lengths=(8, 5, 2), some_rows_end=True),
    Fixture("buckets", seed=15, config=dict(
        COMMON, d_model=16, d_kv=6, d_ff=24, num_heads=3, relative_attention_num_buckets=16,
        relative_attention_max_distance=20, tie_word_embeddings=False, eos_token_id=45), enc_len=48,
        dec_len=40, all_rows_end=True),
]


class Rejected(Exception):
    """This seed gives a near-tie or trivial routing: try the next one."""


def build_model(fx: Fixture, seed: int) -> SwitchTransformersForConditionalGeneration:
    torch.manual_seed(seed)
    model = SwitchTransformersForConditionalGeneration(SwitchTransformersConfig(**fx.config))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("router.classifier.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * ROUTER_STD)
            elif name.endswith((".o.weight", ".wo.weight")):
                p.mul_(SUBLAYER_GAIN)
        if not fx.config.get("tie_word_embeddings", True):
            model.encoder.embed_tokens.weight.copy_(model.shared.weight)
            model.decoder.embed_tokens.weight.copy_(model.shared.weight)
    return model.eval()


def make_inputs(fx: Fixture, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    v = fx.config["vocab_size"]

    def ids_and_mask(length, lengths, start):
        ids = rng.integers(2, v, size=(fx.batch, length))  # never pad (0) or EOS (1)
        if start:
            ids[:, 0] = fx.config["decoder_start_token_id"]
        mask = np.ones((fx.batch, length), np.int64)
        for row, n in enumerate(lengths or ()):
            mask[row, n:] = 0
            ids[row, n:] = fx.config["pad_token_id"]
        return ids.astype(np.int64), mask

    input_ids, attention_mask = ids_and_mask(fx.enc_len, fx.enc_lengths, False)
    decoder_input_ids, decoder_attention_mask = ids_and_mask(fx.dec_len, fx.dec_lengths, True)
    return dict(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=decoder_attention_mask)


def top2_margin(logits: torch.Tensor) -> float:
    top = torch.topk(logits.float(), 2, dim=-1).values
    return float((top[..., 0] - top[..., 1]).min())


def mean_top1(out) -> float:
    logits = torch.cat(out.encoder_router_logits + out.decoder_router_logits, dim=1)
    return float(torch.softmax(logits, -1).max(-1).values.mean())


def check_routing(fx: Fixture, router_logits: tuple, stack: str) -> int:
    """Asserts non-trivial routing with no near-ties; returns the number of capacity-dropped tokens."""
    capacity = fx.config["expert_capacity"]
    dropped = 0
    for layer, logits in enumerate(router_logits):  # each [B, S, E]
        index = logits.argmax(-1)
        used = torch.unique(index).numel()
        if used < 2:
            raise Rejected(f"{stack} sparse layer {layer} routes every token to one expert")
        margin = top2_margin(logits)
        if margin < MIN_MARGIN:
            raise Rejected(f"{stack} sparse layer {layer} has a router near-tie ({margin:.2g})")
        onehot = torch.nn.functional.one_hot(index, logits.shape[-1])
        dropped += int(((torch.cumsum(onehot, 1) * onehot).sum(-1) > capacity).sum())
    return dropped


def make_fixture(fx: Fixture, out_dir: str, attempts: int = 20) -> None:
    """Writes one fixture, from the first seed fx.seed + 100 * k that passes the checks."""
    for k in range(attempts):
        try:
            return try_seed(fx, fx.seed + 100 * k, out_dir)
        except Rejected as e:
            print(f"{fx.name}: seed {fx.seed + 100 * k} rejected: {e}")
    raise SystemExit(f"{fx.name}: no usable seed in {attempts} attempts")


def try_seed(fx: Fixture, seed: int, out_dir: str) -> None:
    model = build_model(fx, seed)
    inputs = make_inputs(fx, seed)
    t = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with torch.no_grad():
        out = model(**t, output_router_logits=True)
        enc_drop = check_routing(fx, out.encoder_router_logits, "encoder")
        dec_drop = check_routing(fx, out.decoder_router_logits, "decoder")
        if fx.must_drop:
            assert enc_drop > 0 and dec_drop > 0, f"{fx.name}: no token dropped ({enc_drop}, {dec_drop})"
        else:
            assert enc_drop == dec_drop == 0, f"{fx.name}: tokens dropped ({enc_drop}, {dec_drop})"
        # A config-less cache grows per layer: the one `generate` builds from the config has
        # `num_layers` (encoder) layers and fails when the decoder is deeper (transformers 5.23).
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        gen = model.generate(t["input_ids"], attention_mask=t["attention_mask"],
                             max_new_tokens=fx.max_new_tokens, do_sample=False, num_beams=1,
                             past_key_values=cache, output_scores=True, return_dict_in_generate=True)
    # Greedy near-ties, over rows still running at each step.
    finished = torch.zeros(fx.batch, dtype=torch.bool)
    gen_margin = float("inf")
    for step, scores in enumerate(gen.scores):
        if (~finished).any():
            gen_margin = min(gen_margin, top2_margin(scores[~finished]))
        finished |= gen.sequences[:, step + 1] == fx.config["eos_token_id"]
    if gen_margin < MIN_MARGIN:
        raise Rejected(f"greedy near-tie ({gen_margin:.2g})")
    new = gen.sequences[:, 1:]
    ended = (new == fx.config["eos_token_id"]).any(1)
    if fx.some_rows_end and not (ended.any() and not ended.all()):
        raise Rejected("expected some (not all) rows to end with EOS")
    if fx.all_rows_end and not (ended.all() and new.shape[1] < fx.max_new_tokens):
        raise Rejected("expected every row to end with EOS before max_new_tokens")

    def scalar(x):
        return np.float32(x.item() if torch.is_tensor(x) else x)

    expected = dict(inputs, logits=out.logits.numpy().astype(np.float32),
                    encoder_z_loss=scalar(out.encoder_z_loss), encoder_aux_loss=scalar(out.encoder_aux_loss),
                    decoder_z_loss=scalar(out.decoder_z_loss), decoder_aux_loss=scalar(out.decoder_aux_loss),
                    encoder_router_logits=torch.cat(out.encoder_router_logits, 1).numpy(),
                    decoder_router_logits=torch.cat(out.decoder_router_logits, 1).numpy(),
                    greedy=gen.sequences.numpy(), max_new_tokens=np.int64(fx.max_new_tokens),
                    seed=np.int64(seed))
    path = os.path.join(out_dir, fx.name)
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)  # transformers 5 always writes safetensors (no safe_serialization flag)
    np.savez_compressed(os.path.join(tmp, "expected.npz"), **expected)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    logits = out.logits
    print(f"{fx.name:10s} seed {seed:4d} logits {tuple(logits.shape)} std {logits.std():.3f} "
          f"distinct argmax {torch.unique(logits.argmax(-1)).numel():3d} | "
          f"mean top-1 prob {mean_top1(out):.3f} | dropped enc {enc_drop} dec {dec_drop} | "
          f"losses z {scalar(out.encoder_z_loss):.4f}/{scalar(out.decoder_z_loss):.4f} "
          f"aux {scalar(out.encoder_aux_loss):.4f}/{scalar(out.decoder_aux_loss):.4f} | "
          f"greedy {gen.sequences.shape[1] - 1} new, margin {gen_margin:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "hf"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    for fx in FIXTURES:
        make_fixture(fx, args.out)


if __name__ == "__main__":
    main()
