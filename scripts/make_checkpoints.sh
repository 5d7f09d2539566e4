#!/usr/bin/env bash
# Regenerate every shipped checkpoint and report from scratch: `make checkpoints`.
# Resumable: rerun after an interruption and finished steps are skipped, a killed training resumes.
# Takes roughly 2-3 hours on a 2-core CPU (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
EGT=${EGT:-.venv/bin/egt}
EPOCHS=${EPOCHS:-12}
THREADS=${THREADS:-1}

train() {  # train DATASET NAME LAMBDA
  local ds=$1 name=$2 lam=$3 out="runs/$1/$2"
  local done=0
  [ -f "$out/train.jsonl" ] && done=$(wc -l < "$out/train.jsonl")
  if [ "$done" -ge "$EPOCHS" ]; then echo "$out: already trained"; return; fi
  local resume=""
  [ -f "$out/resume.safetensors" ] && resume="--resume"
  "$EGT" train --dataset "$ds" --epochs "$EPOCHS" --lambda "$lam" --seed 0 \
    --threads "$THREADS" --out "$out" $resume
}

for ds in fashion-mnist shapes; do
  sweep="checkpoints/$ds/lambda_sweep.json"
  [ -f "$sweep" ] || "$PY" scripts/select_lambda.py --dataset "$ds" --out "$sweep"
  lam=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['chosen_lambda'])" "$sweep")
  train "$ds" baseline 0
  train "$ds" egt "$lam"
  for name in baseline egt; do
    "$PY" scripts/ship_checkpoint.py "runs/$ds/$name" "checkpoints/$ds/$name.safetensors"
  done
  "$EGT" eval --checkpoint "checkpoints/$ds/baseline.safetensors" \
    --checkpoint "checkpoints/$ds/egt.safetensors" --out "checkpoints/$ds" --quiet
done
"$PY" scripts/results_table.py > checkpoints/RESULTS.md
echo "done: checkpoints/ and checkpoints/RESULTS.md"
