#!/bin/bash
# The seed's memory table (batch 8, fp32, AdamW, LoRA r=8 alpha=32 dropout 0.1, sequence length 64)
# compiled on the CPU backend: every method per model. Nothing is allocated; each row is one
# compile (seconds for a 7B decoder, minutes for a T5 on 2 busy cores).
# LLVM optimisation level 0 only shortens code generation: XLA's buffer assignment, hence every
# figure, is the same (checked: llama2-7b LoRA, identical memory and cost analyses).
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-experiments/memory_table/cpu}
PY=${PY:-.venv/bin/python}
export XLA_FLAGS="${XLA_FLAGS:---xla_backend_optimization_level=0}"
COMMON="--batch=8 --seq=64 --config.train.clip_norm=0"
LORA="--config.method.rank=8 --config.method.alpha=32 --config.method.dropout=0.1"
FISHER='{"fishmask": {"num_examples": 8, "progress": false}, "child_tuning_d": {"progress": false}}'
METHODS=${METHODS:-all}
MODELS=${MODELS-"llama2-7b bloomz-7b1 T0_3B mt0-xxl"}  # the committed files: see README (coverage)
for model in $MODELS; do
  case $model in
    T0_3B|mt0-xxl) head="--head=seq2seq_lm --target_seq=4" ;;
    *) head="--head=causal_lm" ;;
  esac
  name=$(echo "$model" | tr 'A-Z.-' 'a-z__')
  echo "=== $model"
  $PY scripts/memory.py --config=configs/train.py:model=$model,method=lora $COMMON $LORA $head \
    --methods="$METHODS" --method_overrides="$FISHER" --out="$OUT/$name.json" > /dev/null
done

# Rematerialisation's effect on the CPU backend (llama2-7b LoRA) and gradient clipping's
# (llama2-7b full fine-tuning with the trainer's default clip_norm=1.0: every gradient must exist
# before the first update). Run with REMAT=1.
if [ "${REMAT:-0}" = 1 ]; then
  for remat in none block block_dots; do
    $PY scripts/memory.py --config=configs/train.py:model=llama2-7b,method=lora $COMMON $LORA --head=causal_lm \
      --config.train.remat=$remat --methods=lora --out="$OUT/llama2_7b_remat_$remat.json" > /dev/null
  done
  $PY scripts/memory.py --config=configs/train.py:model=llama2-7b,method=full --batch=8 --seq=64 \
    --config.train.clip_norm=1.0 --head=causal_lm --methods=full --out="$OUT/llama2_7b_full_clip.json" > /dev/null
fi

# A quantized frozen base (issue 20): llama2-7b LoRA r8 with bf16 compute and a bf16 frozen
# base, NF4 + double quantization (QLoRA), int8, and the plain bf16 base. Run with QUANT=1.
if [ "${QUANT:-0}" = 1 ]; then
  BF16="--config.train.dtype=bfloat16 --frozen_dtype=bfloat16"
  run() { $PY scripts/memory.py --config=configs/train.py:model=llama2-7b,method=lora $COMMON $LORA \
            --head=causal_lm --methods=lora "$@" > /dev/null; }
  run $BF16 --config.model.quant=nf4 --config.model.double_quant=True --out="$OUT/llama2_7b_qlora_nf4_dq_bf16.json"
  run $BF16 --config.model.quant=nf4 --config.model.double_quant=True --config.train.remat=block \
    --out="$OUT/llama2_7b_qlora_nf4_dq_bf16_remat_block.json"
  run --config.model.quant=nf4 --config.model.double_quant=True --out="$OUT/llama2_7b_qlora_nf4_dq_fp32.json"
  run $BF16 --config.model.quant=int8 --out="$OUT/llama2_7b_lora_int8_bf16.json"
  run $BF16 --out="$OUT/llama2_7b_lora_bf16_base.json"
  run $BF16 --config.train.remat=block --out="$OUT/llama2_7b_lora_bf16_base_remat_block.json"
  # the MoE (issue 21): experts quantized expert by expert
  $PY scripts/memory.py --config=configs/train.py:model=Qwen3-30B-A3B,method=lora $COMMON $LORA \
    --head=causal_lm --methods=lora $BF16 --config.model.quant=nf4 --config.model.double_quant=True \
    --out="$OUT/qwen3_30b_a3b_qlora_nf4_dq_bf16.json" > /dev/null
fi
