#!/usr/bin/env bash
# Trains the built-in default model (pregated_jax/assets/default_model) and scores it: the recipe behind
# the shipped weights. About 4 minutes of training on one H100/H200 alone (8 minutes with three running side
# by side); hours on a CPU.
#
#   bash scripts/train_default_model.sh [VARIANT] [WORKDIR] [OUT]
#
# VARIANT picks the shape (every one is pre-gated, 4+4 layers, d_model 192, 6 heads, T5 vocabulary, ≤ 30 MB
# in bfloat16); the shipped model is "c":
#   a: 8 experts of d_ff 768 in 1+1 MoE blocks    (14.4 M parameters, 28.9 MB bf16)
#   b: 16 experts of d_ff 384 in 1+1 MoE blocks   (13.6 M, 27.1 MB)
#   c: 8 experts of d_ff 448 in 2+2 MoE blocks    (14.1 M, 28.3 MB)
# WORKDIR (default runs/default_<VARIANT>) gets the training run and eval/scores.json (ROUGE on the first
# 1,000 Debian validation examples, greedy, 24 new tokens); OUT (default WORKDIR/export) gets the bf16
# Hugging Face-format export. STEPS overrides the 9,000 training steps.
set -euo pipefail
cd "$(dirname "$0")/.."
variant="${1:-c}"
workdir="${2:-runs/default_$variant}"
out="${3:-$workdir/export}"
PY="${PYTHON:-python3}"
case "$variant" in
  a) shape="'d_ff': 768, 'num_sparse_encoder_layers': 1, 'num_sparse_decoder_layers': 1, 'num_experts': 8" ;;
  b) shape="'d_ff': 384, 'num_sparse_encoder_layers': 1, 'num_sparse_decoder_layers': 1, 'num_experts': 16" ;;
  c) shape="'d_ff': 448, 'num_sparse_encoder_layers': 2, 'num_sparse_decoder_layers': 2, 'num_experts': 8" ;;
  *) echo "train_default_model.sh: unknown variant '$variant' (one of: a, b, c)" >&2; exit 2 ;;
esac
# debian_small.gin: Adafactor, rsqrt decay after 1,000 warmup steps (peak 1e-2), batch 64, inputs ≤ 256
# tokens, targets ≤ 32, dropout 0.1, seed 0.
"$PY" scripts/train.py --gin_file configs/debian_small.gin --gin.ROUTING="'pregated'" \
  --gin.ModelConfig.overrides="{'d_model': 192, 'd_kv': 32, 'num_heads': 6, 'num_layers': 4, \
'num_decoder_layers': 4, 'expert_capacity': None, 'routing': 'pregated', $shape}" \
  --gin.TrainingConfig.num_steps="${STEPS:-9000}" --gin.TrainingConfig.eval_every=1500 \
  --gin.TrainingConfig.checkpoint_every=3000 --gin.TrainingConfig.keep_checkpoints=1 --workdir "$workdir"
"$PY" scripts/evaluate.py --checkpoint "$workdir" --task debian --workdir "$workdir/eval" --max_examples 1000 \
  --max_new_tokens 24 --batch_size 64 --max_input_len 256 --pad_to_multiple 128 --mode gpu-only
"$PY" scripts/export_hf.py --checkpoint "$workdir" --out "$out" --dtype bfloat16
