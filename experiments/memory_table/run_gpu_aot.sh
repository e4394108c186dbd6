#!/bin/bash
# The memory table compiled by XLA's GPU compiler for a GPU on a machine without one
# (scripts/memory.py --compile_for=TARGET: a compile-only device of jax's CUDA plugin; `make gpu-aot`
# installs it; peftjax/gpu_target.py says what the figures are and are not). Writes
# <target>_aot/*.json. GEMM autotuning needs a device: off, as in run_gpu.sh's attached-card compiles.
#
#   bash experiments/memory_table/run_gpu_aot.sh            # check seed quant methods (~1.5 h, 2 cores)
#   WHAT="quant fused" bash experiments/memory_table/run_gpu_aot.sh
set -u
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
WHAT=${WHAT:-"check seed quant methods"}
export XLA_FLAGS="--xla_gpu_autotune_level=0"
COMMON="--batch=8 --seq=64 --config.train.clip_norm=0"
LORA="--config.method.rank=8 --config.method.alpha=32 --config.method.dropout=0.1"
BF16="--config.train.dtype=bfloat16 --frozen_dtype=bfloat16"
NF4="--config.model.quant=nf4 --config.model.double_quant=True"
# The rows before the fused kernel (peftjax/models/quant_matmul.py) planned XLA's
# dequantize-then-dot; they keep that path, the `fused` entry plans the kernel.
XLAQ="--config.model.quant_matmul=xla"
T5="--head=seq2seq_lm --target_seq=4"
FISHER='{"fishmask": {"num_examples": 8, "progress": false}, "child_tuning_d": {"progress": false}}'
# mem TARGET MODEL FILE FLAGS...: one scripts/memory.py call (--config before its overrides)
mem() { local target=$1 model=$2 file=$3; shift 3; echo "--- $target $model $file $*" | cut -c1-220
        mkdir -p experiments/memory_table/${target}_aot
        $PY scripts/memory.py --config=configs/train.py:model=$model,method=lora $COMMON $LORA \
          --compile_for=$target --out=experiments/memory_table/${target}_aot/$file.json "$@" > /dev/null; }
CAUSAL="--head=causal_lm"

for what in $WHAT; do
  case $what in
    # The rows an attached H200 compiled (gpu/, run_gpu.sh), compiled here for an H200.
    check)
      mem h200 llama2-7b llama2_7b $CAUSAL --methods=lora,full
      mem h200 bloomz-7b1 bloomz_7b1 $CAUSAL --methods=lora,full
      mem h200 bloomz-7b1 bloomz_7b1_remat $CAUSAL --config.train.remat=block --methods=lora
      mem h200 T0_3B t0_3b $T5 --methods=lora,full
      ;;
    # The seed's table (fp32, AdamW, LoRA r8) for an 80 GB card, with QLoRA columns (NF4 + double
    # quant, fp32 compute); the seed measured on an A100 80GB, compiled here for an H100 80GB.
    seed)
      mem h100 llama2-7b llama2_7b $CAUSAL --methods=lora,full
      mem h100 bloomz-7b1 bloomz_7b1 $CAUSAL --methods=lora,full
      mem h100 bloomz-7b1 bloomz_7b1_remat $CAUSAL --config.train.remat=block --methods=lora
      mem h100 T0_3B t0_3b $T5 --methods=lora,full
      mem h100 llama2-7b llama2_7b_qlora_nf4_dq_fp32 $CAUSAL $NF4 $XLAQ
      mem h100 bloomz-7b1 bloomz_7b1_qlora_nf4_dq_fp32 $CAUSAL $NF4 $XLAQ
      mem h100 T0_3B t0_3b_qlora_nf4_dq_fp32 $T5 $NF4 $XLAQ
      ;;
    # Issue 20's rows: llama2-7b LoRA r8 (q, v), bf16 compute, on an NF4 + double-quant, int8 or
    # bf16 frozen base, with and without block rematerialisation.
    quant)
      mem h100 llama2-7b llama2_7b_qlora_nf4_dq_bf16 $CAUSAL $BF16 $NF4 $XLAQ
      mem h100 llama2-7b llama2_7b_qlora_nf4_dq_bf16_remat_block $CAUSAL $BF16 $NF4 $XLAQ --config.train.remat=block
      mem h100 llama2-7b llama2_7b_lora_int8_bf16 $CAUSAL $BF16 --config.model.quant=int8 $XLAQ
      mem h100 llama2-7b llama2_7b_lora_bf16_base $CAUSAL $BF16
      mem h100 llama2-7b llama2_7b_lora_bf16_base_remat_block $CAUSAL $BF16 --config.train.remat=block
      ;;
    # Issue 20's quantized rows again, the quantized matmuls as peftjax's fused kernel (a Pallas
    # Triton kernel reading the packed codes: what a GPU run now does).
    fused)
      mem h100 llama2-7b llama2_7b_qlora_nf4_dq_bf16_fused $CAUSAL $BF16 $NF4
      mem h100 llama2-7b llama2_7b_qlora_nf4_dq_bf16_remat_block_fused $CAUSAL $BF16 $NF4 --config.train.remat=block
      mem h100 llama2-7b llama2_7b_lora_int8_bf16_fused $CAUSAL $BF16 --config.model.quant=int8
      mem rtx4090 llama2-7b llama2_7b_all_methods_nf4_dq_bf16_fused $CAUSAL $BF16 $NF4 --methods=all \
        --method_overrides="$FISHER"
      ;;
    # Every registered method on the NF4 base (bf16 compute, no remat): for an H100, and for the
    # 24 GB consumer card the issue asks about.
    methods)
      for target in h100 rtx4090; do
        mem $target llama2-7b llama2_7b_all_methods_nf4_dq_bf16 $CAUSAL $BF16 $NF4 $XLAQ --methods=all \
          --method_overrides="$FISHER"
        # prompt tuning's 672-row GEMMs stop XLA's Triton GEMM tiling (an internal error, recorded
        # in the file above): the same step with cuBLAS for every GEMM
        XLA_FLAGS="$XLA_FLAGS --xla_gpu_enable_triton_gemm=false" \
          mem $target llama2-7b llama2_7b_prompt_tuning_nf4_dq_bf16_cublas $CAUSAL $BF16 $NF4 $XLAQ --methods=prompt_tuning
      done
      ;;
    # T5-XXL compiles take long (CPU backend: 4-16 min a row); on their own.
    mt0)
      mem h100 mt0-xxl mt0_xxl_qlora_nf4_dq_fp32 $T5 $NF4 $XLAQ
      mem h100 mt0-xxl mt0_xxl $T5 --methods=lora,full
      ;;
    # The MoE (issue 21): XLA:GPU lowers ragged_dot to a grouped GEMM (the CPU to a masked product,
    # hence peftjax's tiled scan there); LoRA r8 q, v in fp32 and on the NF4 base.
    moe)
      mem h100 Qwen3-30B-A3B qwen3_30b_a3b_qlora_nf4_dq_bf16 $CAUSAL $BF16 $NF4 $XLAQ
      mem h100 Qwen3-30B-A3B qwen3_30b_a3b $CAUSAL
      ;;
    # The MoE's QLoRA row with the fused kernel on the expert stacks too (rows in tiles of one
    # expert): for an H100 and for the 24 GB RTX 4090.
    moe_fused)
      mem h100 Qwen3-30B-A3B qwen3_30b_a3b_qlora_nf4_dq_bf16_fused $CAUSAL $BF16 $NF4
      mem rtx4090 Qwen3-30B-A3B qwen3_30b_a3b_qlora_nf4_dq_bf16_fused $CAUSAL $BF16 $NF4
      ;;
    *) echo "unknown WHAT entry: $what (valid: check seed quant fused methods mt0 moe moe_fused)" >&2; exit 2 ;;
  esac
done
