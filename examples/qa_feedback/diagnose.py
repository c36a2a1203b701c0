"""What the qa-feedback human edits look like, and how far model-free heuristics get.

Reads converted files (``pairs.jsonl`` with prompt/chosen/rejected, ``edits.jsonl`` with
prompt/rejected/edited/gold_spans) and prints JSON with:

- edit statistics (model-free word tokens, :func:`finegrain.edit.distance.edit_stats`): edit
  ratio quantiles, how often the edit only deletes, length of the edited vs the original answer,
  share of the original's characters inside the human error spans;
- heuristic accuracies, the floor any reward model must beat: "the shorter answer is better"
  and "the longer answer is better", on preference pairs and on edit pairs.

    python diagnose.py split/test/pairs.jsonl split/test/edits.jsonl
"""
from __future__ import annotations

import argparse
import json
import statistics

from finegrain.edit.distance import edit_stats, words
from finegrain.io import iter_records


def quantiles(xs: list[float]) -> dict[str, float]:
    qs = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return {"p25": round(qs[0], 3), "median": round(qs[1], 3), "p75": round(qs[2], 3), "mean": round(statistics.fmean(xs), 3)}


def shorter_wins(better: str, worse: str) -> float:
    """1 if the better answer has fewer words, 0 if more, 0.5 on a tie."""
    a, b = len(words(better)), len(words(worse))
    return 0.5 if a == b else float(a < b)


def heuristics(pairs: list[tuple[str, str]]) -> dict[str, float]:
    """Accuracy (and its standard error) of "shorter is better" on (better, worse) pairs."""
    hits = [shorter_wins(b, w) for b, w in pairs]
    acc = statistics.fmean(hits)
    se = (acc * (1 - acc) / len(hits)) ** 0.5
    return {"n": len(hits), "shorter_is_better": round(acc, 4), "longer_is_better": round(1 - acc, 4),
            "se": round(se, 4)}


def edit_summary(rows: list[dict]) -> dict:
    stats = [edit_stats(r["rejected"], r["edited"]) for r in rows]
    span_share = [sum(e - s for s, e in r.get("gold_spans") or []) / max(1, len(r["rejected"])) for r in rows]
    return {
        "n": len(rows),
        "edit_ratio": quantiles([s["edit_ratio"] for s in stats]),
        "only_deletes": round(statistics.fmean(s["tokens_inserted"] == 0 for s in stats), 4),
        "edited_over_original_words": quantiles([s["edited_tokens"] / max(1, s["original_tokens"]) for s in stats]),
        "original_words": quantiles([float(s["original_tokens"]) for s in stats]),
        "error_span_char_share": quantiles(span_share),
        "with_error_spans": round(statistics.fmean(bool(r.get("gold_spans")) for r in rows), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pairs", help="preference pairs (prompt, chosen, rejected)")
    ap.add_argument("edits", help="edited pairs (prompt, rejected, edited, gold_spans)")
    args = ap.parse_args()
    prefs = [r for _, r in iter_records(args.pairs)]
    edits = [r for _, r in iter_records(args.edits) if r["edited"] != r["rejected"]]
    print(json.dumps({
        "edits": edit_summary(edits),
        "heuristics_preference": heuristics([(r["chosen"], r["rejected"]) for r in prefs]),
        "heuristics_edit": heuristics([(r["edited"], r["rejected"]) for r in edits]),
    }, indent=2))


if __name__ == "__main__":
    main()
