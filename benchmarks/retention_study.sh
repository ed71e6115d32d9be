#!/usr/bin/env bash
# Issue #17: paper 002's retention study at ftedit's real edit location, all four tasks, every strategy.
# One `ftedit retention` run per task (gemma-3-270m), plus SFT on SmolLM2-135M-Instruct through its chat
# template. The thresholds below are starting points, not calibrated: check each task's report for runs the
# step cap stopped ("Runs the step cap stopped") and adjust the threshold or the cap, never the probes.
#   benchmarks/retention_study.sh OUT_DIR [N_EDITS] [N_INTRINSIC]
# Interrupted? Run the same command again: finished studies are skipped and the others resume (--resume).
set -euo pipefail
OUT=${1:?usage: $0 OUT_DIR [N_EDITS] [N_INTRINSIC]}
N=${2:-100}
NI=${3:-100}
D=${DATA:-../shared/data}
FTEDIT=${FTEDIT:-ftedit}
LOCK=${LOCK:-/tmp/ftedit-realmodel.lock}
# locft-bf at its located layer; FT-M (paper 002's FT: one MLP projection, stop at loss 0.01) at its layer 1; ROME
METHODS=(--method locft-bf --method ft-m --set ft-m:params.layers=1 --method rome)
STRATEGIES=(--strategy none --strategy edits --strategy below:edit --strategy around:1
            --strategy rehearsal:0.25 --strategy anchor:1)
COMMON=(--edits "$D/counterfact/easyedit/counterfact-edit.json" --n "$N"
        --intrinsic-pool "$D/counterfact/easyedit/counterfact-train.json" --n-intrinsic "$NI"
        --max-steps "${MAX_STEPS:-1000}" --eval-every 10 --probe-every 20 --lr 5e-5 --batch-size 8 --no-progress)

complete() {  # the study in $1 has finished
  python3 -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1])).get("complete") else 1)' \
    "$1/result.json" 2>/dev/null
}

run() {  # run NAME MODEL TASK THRESHOLD [extra options]; rerunning the script continues where it stopped
  local name=$1 model=$2 task=$3 threshold=$4
  shift 4
  if complete "$OUT/$name"; then echo "$name: complete, skipped"; return; fi
  flock "$LOCK" "$FTEDIT" retention --out "$OUT/$name" --model "$model" --task "$task" --threshold "$threshold" \
    "${COMMON[@]}" "${STRATEGIES[@]}" --resume "$@"
}

run lm demo "lm=$D/downstream/wiki_summaries.jsonl" "lm=${LM_THRESHOLD:-rel:0.95}" "${METHODS[@]}"
run facts demo "facts=$D/counterfact/easyedit/counterfact-train.json" "facts=${FACTS_THRESHOLD:-0.9}" "${METHODS[@]}"
run classification demo "classification=$D/downstream/movie_review_sentiment.jsonl" \
  "classification=${CLS_THRESHOLD:-0.8}" "${METHODS[@]}"
run sft demo "sft=$D/downstream/sharegpt_sft.jsonl" "sft=${SFT_THRESHOLD:-rel:0.9}" "${METHODS[@]}" --max-length 128
run sft-smollm2 smollm2 "sft=$D/downstream/sharegpt_sft.jsonl" "sft=${SFT_THRESHOLD:-rel:0.9}" \
  --method locft-bf --max-length 128
