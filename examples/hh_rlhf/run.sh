#!/usr/bin/env bash
# Anthropic HH (harmless-base, 1,800 test pairs): a sequence reward model and its held-out accuracy,
# a sanity anchor for finegrain's reward-model code on a standard dataset.
#
#   examples/hh_rlhf/run.sh                      # MiniLM-L6, about 10-15 minutes on 2 CPU cores
#   HH_DATA=path/to/test.jsonl.gz OUT=runs/hh examples/hh_rlhf/run.sh
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
HH_DATA="${HH_DATA:-$ROOT/../shared/data/hh_rlhf/harmless_base_test_1800.jsonl.gz}"
OUT="${OUT:-$ROOT/runs/hh_rlhf}"
CONFIG="${CONFIG:-$HERE/rm_minilm.yaml}"
PY="${PYTHON:-python}"
FG="${FINEGRAIN:-finegrain}"
mkdir -p "$OUT"

# 1. transcripts -> (prompt = shared prefix, chosen, rejected); 2 records whose last assistant turn
#    is empty are rejected (listed in converted/rejects.jsonl) instead of stopping the run.
"$FG" convert --from hh "$HH_DATA" --output "$OUT/converted" --skip-invalid
# 2. 10% of the prompts held out (no prompt on both sides)
"$PY" "$HERE/../qa_feedback/split_by_question.py" "$OUT/converted/pairs.jsonl" --out "$OUT/split" \
  --test-fraction 0.1 --seed 0
# 3. train (1 epoch), 4. evaluate on the held-out pairs
start=$SECONDS
"$FG" train-rm --config "$CONFIG" --data "$OUT/split/train/pairs.jsonl" --output "$OUT/seq_rm"
echo "train_seconds $((SECONDS - start))" | tee "$OUT/times.txt"
"$FG" eval-rm --model "$OUT/seq_rm" --data "$OUT/split/test/pairs.jsonl" --pairs preference \
  --output "$OUT/seq_rm/eval_preference.json"
"$PY" - "$OUT" <<'PY'
import json, sys
test = json.load(open(f"{sys.argv[1]}/seq_rm/eval_preference.json"))
print(f"held-out accuracy {100*test['accuracy']:.1f} ± {100*test['accuracy_se']:.1f} (n={test['n_pairs']})")
PY
