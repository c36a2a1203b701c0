#!/usr/bin/env bash
# qa-feedback (Wu et al. 2023): reward models from REAL human minimal edits vs human preferences.
#
# 350 ASQA questions, each with 4 sampled answers, 6 human pairwise preferences among them, and a
# human correction of "prediction 1" with the erroneous character spans marked. Four reward models,
# trained on 80% of the QUESTIONS and evaluated on the other 20%:
#   (a) sequence RM   on the human preferences, one per question (as many pairs as edits; the
#       paper's comparison), and (a+) on all of them (5x more pairs; PREF_ALL=1)
#   (b) sequence RM   on the (corrected > prediction 1) edit pairs
#   (c) token RM, token_edit loss (Eq. 4) on the same edit pairs
#   (d) token RM, token_mean loss (Eq. 1-3) on the same edit pairs
#   (e) token RM, token_label loss (the edit as per-token labels), question only
#   (f) token RM, token_label loss, with the passages (passages first, so a left cut keeps the
#       question), 512 positions
#   (g) token RM, token_mean + the label term, with the passages
#   and (step 6) post-hoc length debiasing of (e), fitted on the training questions
# each scored on held-out human preferences, held-out edit pairs, and (token RMs) the per-token
# AUROC of a low reward against the human error spans.
#
#   examples/qa_feedback/run.sh                        # MiniLM-L6 backbone (default)
#   CONFIG=examples/qa_feedback/rm_smollm2.yaml OUT=runs/qa_feedback_smollm2 examples/qa_feedback/run.sh
#   ONLY="b_seq_edit c_token_edit" examples/qa_feedback/run.sh   # a subset of the four RMs
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
QA_DATA="${QA_DATA:-$ROOT/../shared/data/qa_feedback/dev_feedback_350.json}"
OUT="${OUT:-$ROOT/runs/qa_feedback}"
CONFIG="${CONFIG:-$HERE/rm_minilm.yaml}"
EPOCHS="${EPOCHS:-1}"             # 270 edit pairs, 280 preference pairs (one per question)
PREF_ALL_EPOCHS="${PREF_ALL_EPOCHS:-1}"   # 1,455 preference pairs
ONLY="${ONLY:-c_token_edit b_seq_edit d_token_mean a_seq_pref e_token_label f_token_label_passages g_token_mean_label_passages}"   # add a_seq_pref_all for (a+)
LABEL_EPOCHS="${LABEL_EPOCHS:-3}"  # (e)-(g): three epochs, the best held-out evaluation kept
PY="${PYTHON:-python}"
FG="${FINEGRAIN:-finegrain}"
mkdir -p "$OUT"

# 1. convert: pairs.jsonl (human preferences, ties dropped) and edits.jsonl (corrected vs prediction 1,
#    gold_spans = the human error spans). The question alone is the prompt: the passages (~700 tokens)
#    do not fit a 512-position encoder, and the left-cut of the truncation policy would drop the
#    question first. Six corrections are empty strings (the annotator deleted everything): they are
#    listed in converted/rejects.jsonl instead of stopping the run.
"$FG" convert --from qa-feedback "$QA_DATA" --output "$OUT/converted" --qa-prompt question --skip-invalid
#    and with the passages, placed before the question: the response keeps priority and the prompt is
#    cut from its left, so the question and the passages nearest to it are what a 512-position
#    encoder keeps
"$FG" convert --from qa-feedback "$QA_DATA" --output "$OUT/converted_passages" --qa-prompt passages+question \
  --skip-invalid
# 2. split by question (question_id): 280 train / 70 test questions
"$PY" "$HERE/split_by_question.py" "$OUT/converted/pairs.jsonl" "$OUT/converted/edits.jsonl" \
  --out "$OUT/split" --test-fraction 0.2 --seed 0 --one-per-question
"$PY" "$HERE/split_by_question.py" "$OUT/converted_passages/pairs.jsonl" "$OUT/converted_passages/edits.jsonl" \
  --out "$OUT/split_passages" --test-fraction 0.2 --seed 0
# 3. what the edits look like, and the length heuristics every RM must beat
"$PY" "$HERE/diagnose.py" "$OUT/split/test/pairs.jsonl" "$OUT/split/test/edits.jsonl" > "$OUT/diagnose_test.json"
"$PY" "$HERE/diagnose.py" "$OUT/split/train/pairs.jsonl" "$OUT/split/train/edits.jsonl" > "$OUT/diagnose_train.json"

train() {  # name data pairs loss epochs [split [extra train-rm flags ...]]
  local name=$1 data=$2 pairs=$3 loss=$4 epochs=$5 split=${6:-split} start=$SECONDS
  shift $(( $# < 6 ? $# : 6 ))
  case " $ONLY " in *" $name "*) ;; *) return 0 ;; esac
  "$FG" train-rm --config "$CONFIG" --data "$OUT/$split/train/$data" --pairs "$pairs" --loss "$loss" \
    --epochs "$epochs" --output "$OUT/$name" "$@" > "$OUT/$name.train.json"
  echo "$((SECONDS - start))" > "$OUT/$name/train_seconds.txt"
  "$FG" eval-rm --model "$OUT/$name" --data "$OUT/$split/test/pairs.jsonl" --pairs preference \
    --output "$OUT/$name/eval_preference.json" > /dev/null
  "$FG" eval-rm --model "$OUT/$name" --data "$OUT/$split/test/edits.jsonl" --pairs edit \
    --output "$OUT/$name/eval_edit.json" > /dev/null
}
# (e)-(g) hold out a tenth of their training questions' pairs to keep the best evaluation
BEST=(--eval-fraction 0.1 --eval-every 10)
train c_token_edit   edits.jsonl                  edit       token_edit "$EPOCHS"
train b_seq_edit     edits.jsonl                  edit       sequence   "$EPOCHS"
train d_token_mean   edits.jsonl                  edit       token_mean "$EPOCHS"
train a_seq_pref     pairs.one_per_question.jsonl preference sequence   "$EPOCHS"
train a_seq_pref_all pairs.jsonl                  preference sequence   "$PREF_ALL_EPOCHS"
train e_token_label  edits.jsonl                  edit       token_label "$LABEL_EPOCHS" split "${BEST[@]}"
train f_token_label_passages edits.jsonl          edit       token_label "$LABEL_EPOCHS" split_passages \
  "${BEST[@]}" --max-length 512
train g_token_mean_label_passages edits.jsonl     edit       token_mean  "$LABEL_EPOCHS" split_passages \
  "${BEST[@]}" --max-length 512 --label-weight 1
# 4. the table (results.md, results.json)
"$PY" "$HERE/make_table.py" "$OUT"
# 5. did the RMs learn the answers or their length? (accuracy split by length, rho(score, words))
rms=(); for name in $ONLY; do [ -d "$OUT/$name" ] && rms+=("$OUT/$name"); done
"$PY" "$HERE/analyze_length.py" "$OUT/split/test/edits.jsonl" --pairs edit "${rms[@]}" > "$OUT/length_edit.json"
"$PY" "$HERE/analyze_length.py" "$OUT/split/test/pairs.jsonl" --pairs preference "${rms[@]}" > "$OUT/length_pref.json"
# 6. does regressing length out help a token RM? (length_debias.py: lines fitted on the training questions)
if [ -d "$OUT/e_token_label" ]; then
  (cd "$HERE" && "$PY" length_debias.py "$OUT/e_token_label" --train "$OUT/split/train" --test "$OUT/split/test") \
    > "$OUT/length_debias_e.json"
fi
