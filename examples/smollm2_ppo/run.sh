#!/usr/bin/env bash
# A real PPO run on CPU: SmolLM2-135M-Instruct (LoRA) answering qa-feedback questions, rewarded by
# the token-level reward model trained on human minimal edits (examples/qa_feedback, RM (c)).
# Two runs with equal budgets that differ only in where the reward goes:
#   sequence: the RM's Eq. 1 score on the last response token   [-bKL_1, ..., R - bKL_n]
#   token:    each response token gets its own r_t               [r_1 - bKL_1, ..., r_n - bKL_n]
# Then: reward curves (curves.png) and greedy answers to held-out questions before and after.
#
#   examples/qa_feedback/run.sh            # first: the reward model and the question split
#   examples/smollm2_ppo/run.sh            # STEPS=4 by default; RM=... OUT=... to change
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
QA="${QA:-$ROOT/runs/qa_feedback}"          # output of examples/qa_feedback/run.sh
RM="${RM:-$QA/c_token_edit}"
OUT="${OUT:-$ROOT/runs/smollm2_ppo}"
CONFIG="${CONFIG:-$HERE/ppo.yaml}"
STEPS="${STEPS:-4}"
MODES="${MODES:-sequence token}"
N_SHOW="${N_SHOW:-4}"
PY="${PYTHON:-python}"
FG="${FINEGRAIN:-finegrain}"
mkdir -p "$OUT"

# prompts: the training questions of the qa-feedback split; the held-out ones are for before/after
"$PY" - "$QA/split" "$OUT" <<'PY'
import sys
from finegrain.io import iter_records, write_jsonl
split, out = sys.argv[1], sys.argv[2]
for side, name in (("train", "prompts.jsonl"), ("test", "heldout_prompts.jsonl")):
    seen = {}
    for _, r in iter_records(f"{split}/{side}/edits.jsonl"):
        seen.setdefault(r["prompt"], {"prompt": r["prompt"], "question_id": r.get("question_id")})
    write_jsonl(f"{out}/{name}", list(seen.values()))
    print(f"{len(seen)} {side} questions -> {out}/{name}")
PY

for mode in $MODES; do
  start=$SECONDS
  "$FG" ppo --config "$CONFIG" --reward-model "$RM" --reward-mode "$mode" --prompts "$OUT/prompts.jsonl" \
    --steps "$STEPS" --output "$OUT/$mode" > "$OUT/$mode.summary.json"
  echo "$((SECONDS - start))" > "$OUT/$mode.seconds.txt"
done
labels=(); for mode in $MODES; do labels+=("$mode=$OUT/$mode"); done
"$PY" "$HERE/plot_rewards.py" "$OUT/curves.png" "${labels[@]}" --keys reward kl response_length

# greedy answers to the first N_SHOW held-out questions: the base policy, then each PPO policy
"$FG" generate --model smollm2-135m-instruct --prompts "$OUT/heldout_prompts.jsonl" --limit "$N_SHOW" \
  --temperature 0 --max-new-tokens 48 --generator base --output "$OUT/before.jsonl" > /dev/null
for mode in $MODES; do
  "$FG" generate --model "$OUT/$mode/final" --prompts "$OUT/heldout_prompts.jsonl" --limit "$N_SHOW" \
    --temperature 0 --max-new-tokens 48 --generator "ppo-$mode" --output "$OUT/after_$mode.jsonl" > /dev/null
done
"$PY" "$HERE/before_after.py" "$RM" "$OUT" $MODES > "$OUT/before_after.md"
cat "$OUT/before_after.md"
