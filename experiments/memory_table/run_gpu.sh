#!/bin/bash
# The same table compiled on the GPU backend (what produced gpu/*.json: one NVIDIA H200,
# jax 0.11.2 CUDA, compile only, nothing allocated): LoRA and full fine-tuning per model, and
# LoRA with block rematerialisation. cuBLAS autotuning is off to shorten compiles.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-experiments/memory_table/gpu}
PY=${PY:-python3}
export XLA_FLAGS="--xla_gpu_autotune_level=0" XLA_PYTHON_CLIENT_PREALLOCATE=false
COMMON="--batch=8 --seq=64 --config.train.clip_norm=0"
LORA="--config.method.rank=8 --config.method.alpha=32 --config.method.dropout=0.1"
T5="--head=seq2seq_lm --target_seq=4"
$PY scripts/memory.py --config=configs/train.py:model=T0_3B,method=lora $COMMON $LORA $T5 --methods=lora,full --out=$OUT/t0_3b.json
$PY scripts/memory.py --config=configs/train.py:model=bloomz-7b1,method=lora $COMMON $LORA --head=causal_lm --methods=lora,full --out=$OUT/bloomz_7b1.json
$PY scripts/memory.py --config=configs/train.py:model=llama2-7b,method=lora $COMMON $LORA --head=causal_lm --methods=lora,full --out=$OUT/llama2_7b.json
$PY scripts/memory.py --config=configs/train.py:model=bloomz-7b1,method=lora $COMMON $LORA --config.train.remat=block --head=causal_lm --methods=lora --out=$OUT/bloomz_7b1_remat.json
# not reached in the session's 15 device minutes (T5 compiles take minutes on the GPU backend too):
# $PY scripts/memory.py --config=configs/train.py:model=mt0-xxl,method=lora $COMMON $LORA $T5 --methods=lora,full --out=$OUT/mt0_xxl.json
