#!/bin/bash
# peftjax's train step and decoding against transformers + peft on the same machine (issue 22).
# Run on quiet cores (nothing else running: the figures are ratios of two timings taken in one
# process, but a busy machine still shifts them). Each command writes one JSON into runs/.
#   bash experiments/speed/run.sh            # all; or: WHAT="minilm llama" bash ...
set -eu
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
# One folder per kind of machine (peftjax.host.label: CPU model, generation, widest vector ISA,
# CPU count): a rerun on the same kind replaces its runs, another kind gets its own table.
OUT=${OUT:-experiments/speed/runs/$($PY -m peftjax.host --label)}
mkdir -p "$OUT"
echo "writing into $OUT" >&2
WHAT=${WHAT:-"minilm llama gpt2 t5 generate scan scan_minilm scan_gpt2 scan_t5 scan_depth scan_t5_methods"}
STEPS=${STEPS:-10}   # a median of 10: robust to this machine's occasional 2-4 s stalls
# Every method PEFT also has (bench_vs_peft.py's parity names). Left out where the method has nothing
# to train or the PEFT side is not the same model: BitFit on T5 and on the small Llama (no bias
# terms), OLoRA on GPT-2 (PEFT's OLoRA init ignores Conv1D's
# (in, out) layout and gives lora_A the shape (r, out)).
ALL=lora,rslora,dora,pissa,olora,lora_ga,adalora,vera,hira,ia3,prompt_tuning,prefix_tuning,ln_tuning,bitfit,full
R16='"rank": 16, "alpha": 32, "targets": ".*_proj$"'
for what in $WHAT; do
  case $what in
    minilm)   $PY scripts/bench_vs_peft.py --model=all-MiniLM-L6-v2 --methods=$ALL \
                --batch=32 --seq=64 --steps=$STEPS > $OUT/minilm_classification.json ;;
    llama)    $PY scripts/bench_vs_peft.py --model=bench-llama-small --head=causal_lm --methods=${ALL/bitfit,/} \
                --batch=8 --seq=128 --steps=$STEPS \
                --method_overrides="{\"lora\": {$R16}, \"dora\": {$R16}}" \
                > $OUT/bench_llama_small_causal_lm.json ;;
    gpt2)     $PY scripts/bench_vs_peft.py --model=gpt2 --random_weights --head=causal_lm \
                --methods=${ALL/olora,/} --batch=8 --seq=128 --steps=$STEPS > $OUT/gpt2_causal_lm.json ;;
    t5)       $PY scripts/bench_vs_peft.py --model=bench-t5-small --head=seq2seq_lm --methods=${ALL/bitfit,/} \
                --batch=8 --seq=128 --steps=$STEPS > $OUT/bench_t5_small_seq2seq_lm.json ;;
    generate) $PY scripts/bench_generate.py --model=bench-llama-small --batch=8 --prompt=64 --new=128 \
                > $OUT/bench_llama_small_generate.json ;;
    # The layer-scan option: compile and step time of the small Llama's LoRA and full steps,
    # unrolled and scanned (same process per setting; no PyTorch side).
    scan)     for layers in 8 32; do for scan in false true; do
                $PY scripts/bench.py --model=bench-llama-small --num_layers=$layers --methods=lora,full \
                  --batch=8 --seq=128 --steps=$STEPS --scan_layers=$scan > $OUT/scan_llama_small_${layers}_$scan.json
              done; done ;;
    # The same for the BERT family: MiniLM's 6 layers and a 24-layer stack of its shape.
    scan_minilm) for layers in 6 24; do for scan in false true; do
                $PY scripts/bench.py --model=all-MiniLM-L6-v2 --num_layers=$layers --methods=lora,full \
                  --batch=32 --seq=64 --steps=$STEPS --scan_layers=$scan > $OUT/scan_minilm_${layers}_$scan.json
              done; done ;;
    # GPT-2 small's 12 blocks (random weights) and a 24-block stack of its shape.
    scan_gpt2) for layers in 12 24; do for scan in false true; do
                $PY scripts/bench.py --model=gpt2 --random_weights --num_layers=$layers \
                  --methods=lora,full --batch=8 --seq=128 --steps=$STEPS --scan_layers=$scan \
                  > $OUT/scan_gpt2_${layers}_$scan.json
              done; done ;;
    # T5-small's 6 + 6 blocks and 24 + 24 (text-to-text).
    scan_t5) for layers in 6 24; do for scan in false true; do
                $PY scripts/bench.py --model=bench-t5-small --num_layers=$layers \
                  --methods=lora,full --batch=8 --seq=128 --steps=$STEPS --scan_layers=$scan \
                  > $OUT/scan_t5_small_${layers}_$scan.json
              done; done ;;
    # How the small Llama's LoRA compile grows with depth (1 ... 32 layers; 8 and 32 above):
    # the layer-independent part of the compile bounds what any scan can save.
    scan_depth) for layers in 1 2 4 16; do
                $PY scripts/bench.py --model=bench-llama-small --num_layers=$layers --methods=lora \
                  --batch=8 --seq=128 --steps=$STEPS --scan_layers=false > $OUT/scan_llama_small_${layers}_false.json
              done
              for layers in 2 4 16; do
                $PY scripts/bench.py --model=bench-llama-small --num_layers=$layers --methods=lora \
                  --batch=8 --seq=128 --steps=$STEPS --scan_layers=true > $OUT/scan_llama_small_${layers}_true.json
              done ;;
    # T5-small (6 + 6 blocks) under other methods: is the scan's win LoRA's alone?
    scan_t5_methods) for scan in false true; do
                $PY scripts/bench.py --model=bench-t5-small --num_layers=6 \
                  --methods=ia3,prefix_tuning,adapter,prompt_tuning --batch=8 --seq=128 --steps=$STEPS \
                  --scan_layers=$scan > $OUT/scan_t5_small_6_methods_$scan.json
              done ;;
    *) echo "unknown: $what" >&2; exit 2 ;;
  esac
  echo "done $what"
done
