"""Did a reward model learn the answers, or their length? Accuracy split by length, and the
rank correlation of its score with the answer's length, on held-out pairs.

    python analyze_length.py split/test/edits.jsonl --pairs edit RM_DIR [RM_DIR ...]

For each RM: accuracy on the pairs whose better answer is SHORTER and on those whose better answer
is LONGER (in model-free words), and Spearman's rho between score and word count over all the
answers it scored. An RM that only learned "shorter is better" scores ~100% / ~0% and rho ~ -1.
"""
from __future__ import annotations

import argparse
import json
import statistics

from finegrain.data.schema import comparisons
from finegrain.edit.distance import words


def ranks(xs: list[float]) -> list[float]:
    """Average ranks (1-based), ties sharing their mean rank."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    out = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (Pearson on average ranks)."""
    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / var if var else 0.0


def length_split(better: list[float], worse: list[float], len_better: list[int], len_worse: list[int]) -> dict:
    """Accuracy (ties 1/2) overall and by whether the better answer is the shorter one."""
    def acc(idx: list[int]) -> dict:
        if not idx:
            return {"n": 0, "accuracy": None}
        hits = [1.0 if better[i] > worse[i] else 0.5 if better[i] == worse[i] else 0.0 for i in idx]
        return {"n": len(idx), "accuracy": round(statistics.fmean(hits), 4)}

    n = range(len(better))
    return {"all": acc(list(n)),
            "better_is_shorter": acc([i for i in n if len_better[i] < len_worse[i]]),
            "better_is_longer": acc([i for i in n if len_better[i] > len_worse[i]]),
            "spearman_score_vs_words": round(spearman(better + worse, [float(x) for x in len_better + len_worse]), 4)}


def analyze(rm_dir: str, data: str, pairs: str) -> dict:
    from finegrain.data import load_pairs
    from finegrain.rm import RewardModel

    items = comparisons(load_pairs(data, pairs), pairs)
    rm = RewardModel.load(rm_dir)
    better = rm.score([c.prompt for c in items], [c.better for c in items])
    worse = rm.score([c.prompt for c in items], [c.worse for c in items])
    res = length_split(better, worse, [len(words(c.better)) for c in items], [len(words(c.worse)) for c in items])
    return {"model": rm_dir, "data": data, **res}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", help="held-out pairs")
    ap.add_argument("models", nargs="+", help="reward model directories")
    ap.add_argument("--pairs", default="edit", choices=["edit", "preference"])
    args = ap.parse_args()
    print(json.dumps([analyze(m, args.data, args.pairs) for m in args.models], indent=2))


if __name__ == "__main__":
    main()
