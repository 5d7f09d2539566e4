#!/usr/bin/env bash
# Regenerate every shipped checkpoint and report from scratch: `make checkpoints`.
# Resumable: rerun after an interruption; finished steps are skipped and a killed training resumes.
# About 1.5-2 hours on an idle 2-core CPU (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
EGT=${EGT:-.venv/bin/egt}
EPOCHS=${EPOCHS:-12}
THREADS=${THREADS:-1}
DISTANCE=pearson

train() {  # train DATASET NAME LAMBDA
  local ds=$1 name=$2 lam=$3 out="runs/$1/$2"
  local done=0
  [ -f "$out/train.jsonl" ] && done=$(wc -l < "$out/train.jsonl")
  if [ "$done" -ge "$EPOCHS" ]; then echo "$out: already trained"; return; fi
  local resume=""
  [ -f "$out/resume.safetensors" ] && resume="--resume"
  "$EGT" train --dataset "$ds" --epochs "$EPOCHS" --lambda "$lam" --distance "$DISTANCE" \
    --seed 0 --threads "$THREADS" --out "$out" --quiet $resume
}

# lambda: chosen on Fashion-MNIST's validation split (2-epoch runs on 12k images); the shapes
# models reuse that choice (see README).
sweep=checkpoints/fashion-mnist/lambda_sweep_pearson.json
[ -f "$sweep" ] || "$PY" scripts/select_lambda.py --dataset fashion-mnist --distance "$DISTANCE" \
  --lambdas 0.5 1 2 --tolerance 1.0 --out "$sweep"
lam=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['chosen_lambda'])" "$sweep")

for ds in fashion-mnist shapes; do
  train "$ds" baseline 0
  train "$ds" egt "$lam"
  for name in baseline egt; do
    "$PY" scripts/ship_checkpoint.py "runs/$ds/$name" "checkpoints/$ds/$name.safetensors"
  done
  "$EGT" eval --checkpoint "checkpoints/$ds/baseline.safetensors" \
    --checkpoint "checkpoints/$ds/egt.safetensors" --out "checkpoints/$ds" --threads 1 --quiet
done
"$PY" scripts/results_table.py > checkpoints/RESULTS.md
echo "done: checkpoints/ and checkpoints/RESULTS.md"
