#!/usr/bin/env bash
# AlpacaEval plumbing check, offline: SmolLM2-135M-Instruct answers a random sample of the 805
# AlpacaEval instructions (`finegrain generate`), and `finegrain winrate` compares them with
# text-davinci-003's outputs (the paper's reference) using a LOCAL judge (`--judge hf`).
#
# The local judge is SmolLM2-135M-Instruct itself: a 135M model is far too weak to judge (expect
# position bias and near-random verdicts). This run checks that the whole path works end to end;
# for real numbers run the same command with a strong judge:
#   JUDGE=anthropic JUDGE_MODEL=claude-sonnet-4-5 examples/alpaca_eval/run.sh     (ANTHROPIC_API_KEY)
#   JUDGE=openai    JUDGE_MODEL=gpt-4o            examples/alpaca_eval/run.sh     (OPENAI_API_KEY)
#
#   N=40 MODEL=smollm2-135m-instruct examples/alpaca_eval/run.sh
#   MODEL=runs/smollm2_ppo/token/final NAME=ppo-token examples/alpaca_eval/run.sh   # a PPO policy
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
REFERENCE="${REFERENCE:-$ROOT/../shared/data/alpaca_eval/text_davinci_003_outputs.json}"
OUT="${OUT:-$ROOT/runs/alpaca_eval}"
MODEL="${MODEL:-smollm2-135m-instruct}"
NAME="${NAME:-smollm2-135m-instruct}"
N="${N:-40}"
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-256}"
JUDGE="${JUDGE:-hf}"
JUDGE_MODEL="${JUDGE_MODEL:-smollm2-135m-instruct}"
PY="${PYTHON:-python}"
FG="${FINEGRAIN:-finegrain}"
mkdir -p "$OUT"

# 1. a seeded random sample of N instructions (the file's first N all come from one sub-dataset)
"$PY" - "$REFERENCE" "$OUT/prompts.json" "$N" <<'PY'
import random, sys
from finegrain.io import iter_records, write_json
ref, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = [r for _, r in iter_records(ref)]
sample = sorted(random.Random(0).sample(range(len(rows)), n))
write_json(out, [{"instruction": rows[i]["instruction"], "dataset": rows[i].get("dataset")} for i in sample])
print(f"{n} of {len(rows)} AlpacaEval instructions -> {out}")
PY
# 2. generate (chat template, temperature 0.7, seed 0)
start=$SECONDS
"$FG" generate --model "$MODEL" --prompts "$OUT/prompts.json" --output "$OUT/$NAME.outputs.json" \
  --generator "$NAME" --max-new-tokens "$MAX_NEW_TOKENS" --batch-size 8 --seed 0 > /dev/null
echo "generate_seconds $((SECONDS - start))" | tee "$OUT/$NAME.times.txt"
# 3. judge against text-davinci-003 (references matched by instruction)
start=$SECONDS
"$FG" winrate --outputs "$OUT/$NAME.outputs.json" --reference "$REFERENCE" --judge "$JUDGE" \
  --judge-model "$JUDGE_MODEL" --max-tokens 8 --output "$OUT/$NAME.winrate_$JUDGE.json" \
  --leaderboard "$OUT/leaderboard_$JUDGE.csv"
echo "winrate_seconds $((SECONDS - start))" | tee -a "$OUT/$NAME.times.txt"
