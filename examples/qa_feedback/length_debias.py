"""Does removing the length shortcut help a token RM? Post-hoc length debiasing, fitted on the
training questions and measured on the held-out ones.

    python length_debias.py RM_DIR --train OUT/split/train --test OUT/split/test > length_debias.json

Two corrections, each a least-squares line fitted on the TRAINING questions' responses only
(``pairs.one_per_question.jsonl`` or ``pairs.jsonl``, and ``edits.jsonl``):

- ``score``: s' = s - b * words(response), the response score with its length in words regressed out;
- ``token``: r'_t = r_t - (a + b * n), each token reward with its response's length n in tokens
  regressed out (so the score, the mean token reward, moves too).

Reported before and after, on the held-out questions: accuracy on human preferences and on the edit
pairs, Spearman's rho of score with length, and against the human error spans the pooled token
AUROC, the per-response AUROC and span / token F1. The per-response AUROC is a bound on any such
correction: no function of the response alone changes a ranking of tokens within one response. The
flaw threshold of the corrected rewards is chosen again on the training edits' changed tokens, as
train-rm chooses it, never on the evaluation labels.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from analyze_length import spearman
from finegrain.edit.distance import words
from finegrain.rm.data import load_comparisons
from finegrain.rm.evaluate import best_f1_threshold, flawed_token_labels, localisation
from finegrain.rm.model import RewardModel
from finegrain.rm.scorer import response_scores


def score_side(rm: RewardModel, items, batch_size: int) -> dict:
    """Token rewards, scores, lengths (words, tokens) and offsets of both sides of every pair."""
    out = {}
    for side in ("better", "worse"):
        ex = [rm.encode(c.prompt, getattr(c, side), with_offsets=True) for c in items]
        raw = rm.rewards(ex, batch_size, desc=f"{side}")
        out[side] = {"examples": ex, "rewards": [r.tolist() for r in raw],
                     "scores": response_scores(raw).tolist(),
                     "words": [len(words(getattr(c, side))) for c in items]}
    return out


def line(x: list[float], y: list[float]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line y ~ a + b x."""
    b, a = np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)
    return float(a), float(b)


def accuracy(better: list[float], worse: list[float]) -> float:
    m = np.asarray(better) - np.asarray(worse)
    return round(float(np.mean((m > 0) + 0.5 * (m == 0))), 4)


def token_shift(rewards: list[list[float]], a: float, b: float) -> list[list[float]]:
    return [[x - (a + b * len(r)) for x in r] for r in rewards]


def figures(pref: dict, edit: dict, labels, gold, use, threshold: float | None) -> dict:
    """Held-out accuracy, length correlation and localisation of one version of the rewards."""
    res = {"preference_accuracy": accuracy(pref["better"]["scores"], pref["worse"]["scores"]),
           "edit_accuracy": accuracy(edit["better"]["scores"], edit["worse"]["scores"]),
           "rho_score_vs_words_preferences": round(spearman(pref["better"]["scores"] + pref["worse"]["scores"],
                                                            [float(w) for w in pref["better"]["words"]
                                                             + pref["worse"]["words"]]), 4)}
    loc = localisation([edit["worse"]["rewards"][i] for i in use], [labels[i] for i in use],
                       [edit["worse"]["examples"][i].response_offsets for i in use], gold,
                       [edit["better"]["rewards"][i] for i in use], threshold)
    res.update({k: (round(v, 4) if isinstance(v, float) else v) for k, v in loc.items()
                if k in ("token_auroc", "response_auroc", "token_f1", "span_f1", "flaw_threshold")})
    return res


def corrected(data: dict, kind: str, fit: tuple[float, float]) -> dict:
    """A copy of scored pairs with the ``score`` or ``token`` correction applied."""
    a, b = fit
    out = {}
    for side, d in data.items():
        d = dict(d)
        if kind == "score":
            d["scores"] = [s - b * w for s, w in zip(d["scores"], d["words"])]
        else:
            d["rewards"] = token_shift(d["rewards"], a, b)
            d["scores"] = [float(np.mean(r)) if r else 0.0 for r in d["rewards"]]
        out[side] = d
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="token reward model directory")
    ap.add_argument("--train", required=True, help="split directory of the training questions")
    ap.add_argument("--test", required=True, help="split directory of the held-out questions")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    rm = RewardModel.load(args.model)
    if rm.kind != "token":
        raise SystemExit(f"{args.model}: a token reward model is needed, this one is {rm.kind}")
    train_pref_file = next(p for p in (Path(args.train) / "pairs.one_per_question.jsonl",
                                       Path(args.train) / "pairs.jsonl") if p.exists())
    train_edit_items = load_comparisons(str(Path(args.train) / "edits.jsonl"), "edit", skip_invalid=True)
    train = {"pref": score_side(rm, load_comparisons(str(train_pref_file), "preference", skip_invalid=True),
                                args.batch_size),
             "edit": score_side(rm, train_edit_items, args.batch_size)}
    test_edit_items = load_comparisons(str(Path(args.test) / "edits.jsonl"), "edit", skip_invalid=True)
    test = {"pref": score_side(rm, load_comparisons(str(Path(args.test) / "pairs.jsonl"), "preference",
                                                    skip_invalid=True), args.batch_size),
            "edit": score_side(rm, test_edit_items, args.batch_size)}

    sides = [d[s] for d in train.values() for s in ("better", "worse")]
    fits = {"score": line([w for d in sides for w in d["words"]], [x for d in sides for x in d["scores"]]),
            "token": line([len(r) for d in sides for r in d["rewards"] for _ in r],
                          [x for d in sides for r in d["rewards"] for x in r])}

    # the threshold on the training edits' changed tokens (the human spans of the training questions unused)
    u1_items = [c._replace(gold_spans=None) for c in train_edit_items]
    _, u1 = flawed_token_labels(u1_items, train["edit"]["better"]["examples"], train["edit"]["worse"]["examples"],
                                "edit", rm.tokenizer)
    source, labels = flawed_token_labels(test_edit_items, test["edit"]["better"]["examples"],
                                         test["edit"]["worse"]["examples"], "edit", rm.tokenizer)
    use = [i for i, lab in enumerate(labels) if lab is not None]
    gold = [test_edit_items[i].gold_spans for i in use]

    def threshold(worse_rewards: list[list[float]]) -> float | None:
        keep = [i for i, lab in enumerate(u1) if lab is not None]
        return best_f1_threshold([x for i in keep for x in worse_rewards[i]], [y for i in keep for y in u1[i]])

    rows = {"raw": figures(test["pref"], test["edit"], labels, gold, use, rm.meta.get("flaw_threshold"))}
    for kind in ("score", "token"):
        fixed = {k: corrected(v, kind, fits[kind]) for k, v in test.items()}
        t = threshold(corrected(train["edit"], kind, fits[kind])["worse"]["rewards"]) if kind == "token" \
            else rm.meta.get("flaw_threshold")
        rows[f"{kind}_debiased"] = figures(fixed["pref"], fixed["edit"], labels, gold, use, t)
    print(json.dumps({"model": args.model, "labels": source, "n_labelled_pairs": len(use),
                      "fits": {k: {"intercept": a, "slope": b} for k, (a, b) in fits.items()},
                      "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
