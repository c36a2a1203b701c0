"""Reward-model evaluation: `finegrain eval-rm` as a function.

- ``accuracy``: fraction of pairs where the better response scores higher (ties count 1/2),
  with its binomial standard error; a token RM scores a response by Eq. 1 (mean reward).

Localisation (token RMs): does a LOW token reward point at the flawed tokens of the worse
response? Positives are the gold flawed tokens when the data carries ``gold_spans``
(``token_auroc_source = "gold_spans"``), else, for edit pairs, the changed (U1) tokens of the
rejected response (``"edit_u1"``); the score of a token is -reward.

- ``token_auroc``: rank-based AUROC (ties 1/2) pooled over all tokens of all worse responses;
- ``response_auroc``: the mean of the AUROC within each worse response that has both flawed and
  unflawed tokens (``response_auroc_n`` of them): "in this response, are the bad tokens the
  lowest?", which the pooled figure mixes with "which responses are bad"; as in the pooled
  figure, every scored position counts, the closing token (a reward PPO also receives; never a
  gold flawed token) among the unflawed ones;
- with a flaw threshold (tokens with reward below it are called flawed; by default the one
  train-rm chose on its own training-side pairs and stored as ``flaw_threshold`` in
  finegrain.json, so no evaluation label picks it; ``--flaw-threshold`` overrides):
  ``span_precision`` / ``span_recall`` / ``span_f1`` (maximal runs of flagged tokens as predicted
  character spans; a predicted span is right when it overlaps a gold span, a gold span is found
  when a predicted span overlaps it), ``token_precision`` / ``token_recall`` / ``token_f1``, and
  ``better_flagged_rate``: the fraction of the better responses' tokens called flawed (how often
  the RM cries wolf on the response people preferred), beside ``worse_flagged_rate``.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Sequence

import numpy as np

from ..data.schema import Comparison
from ..io import write_json
from .align import spans_to_token_mask
from .config import EvalRMConfig
from .inputs import RMExample
from .scorer import response_scores

logger = logging.getLogger(__name__)


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve = P(score of a positive > score of a negative), ties counting 1/2.

    Mann-Whitney U from average ranks; None when a class is empty.

    >>> auroc([0.1, 0.4, 0.35, 0.8], [False, False, True, True])
    0.75
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    avg_rank = np.cumsum(counts) - (counts - 1) / 2.0          # 1-based mean rank of each distinct value
    ranks = avg_rank[inverse]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def best_f1_threshold(scores: Sequence[float], flawed: Sequence[bool]) -> float | None:
    """The threshold t with the best token F1 of "reward < t" against ``flawed``; None without positives.

    Candidates lie halfway between consecutive distinct rewards (so tied tokens are flagged together).

    >>> best_f1_threshold([-2.0, -1.0, 0.5, 1.0], [True, True, False, False])
    -0.25
    """
    r = np.asarray(scores, dtype=np.float64)
    y = np.asarray(flawed, dtype=bool)
    if not y.any() or len(r) == 0:
        return None
    order = np.argsort(r, kind="stable")
    r, y = r[order], y[order]
    tp = np.cumsum(y)
    k = np.arange(1, len(r) + 1)
    f1 = 2 * tp / (k + y.sum())
    last = np.r_[r[1:] != r[:-1], True]          # a cut is possible only after the last of tied values
    i = int(np.argmax(np.where(last, f1, -1.0)))
    return float((r[i] + r[i + 1]) / 2) if i + 1 < len(r) else float(r[i] + 1.0)


def flagged_spans(offsets: Sequence[tuple[int, int]], rewards: Sequence[float], threshold: float) -> list[tuple[int, int]]:
    """Character spans of the maximal runs of consecutive tokens with reward < ``threshold`` (zero-width tokens skipped).

    >>> flagged_spans([(0, 3), (3, 7), (7, 9), (9, 12), (12, 12)], [1.0, -1.0, -2.0, 1.0, -3.0], 0.0)
    [(3, 9)]
    """
    spans: list[tuple[int, int]] = []
    run: list[int] | None = None
    for (s, e), r in zip(offsets, rewards):
        if r < threshold and e > s:
            run = [run[0], e] if run else [s, e]
            continue
        if run:
            spans.append((run[0], run[1]))
        run = None
    if run:
        spans.append((run[0], run[1]))
    return spans


def span_scores(predicted: Sequence[Sequence[tuple[int, int]]], gold: Sequence[Sequence[Sequence[int]]]) -> dict:
    """Span precision / recall / F1 by overlap, pooled over responses (see module docstring).

    >>> span_scores([[(0, 4), (10, 12)]], [[(2, 6), (20, 25)]])["span_f1"]
    0.5
    """
    def hits(a, b):
        return sum(any(s < e2 and s2 < e for s2, e2 in b) for s, e in a)

    n_pred = sum(map(len, predicted))
    n_gold = sum(map(len, gold))
    right = sum(hits(p, g) for p, g in zip(predicted, gold))
    found = sum(hits(g, p) for p, g in zip(predicted, gold))
    precision = right / n_pred if n_pred else 0.0
    recall = found / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"span_precision": precision, "span_recall": recall, "span_f1": f1, "n_pred_spans": n_pred,
            "n_gold_spans": n_gold}


def localisation(worse_rewards: Sequence[Sequence[float]], labels: Sequence[Sequence[bool]],
                 worse_offsets: Sequence[Sequence[tuple[int, int]]], gold_spans: Sequence[Sequence[Sequence[int]]],
                 better_rewards: Sequence[Sequence[float]], threshold: float | None) -> dict:
    """Every localisation figure of the module docstring for the pairs that have labels."""
    flat_r = [x for rw in worse_rewards for x in rw]
    flat_y = [x for lab in labels for x in lab]
    per = [auroc([-x for x in rw], lab) for rw, lab in zip(worse_rewards, labels)]
    per = [a for a in per if a is not None]
    out: dict = {"token_auroc": auroc([-x for x in flat_r], flat_y), "token_auroc_n_pos": int(sum(flat_y)),
                 "token_auroc_n_tokens": len(flat_y), "response_auroc": float(np.mean(per)) if per else None,
                 "response_auroc_n": len(per), "flaw_threshold": threshold}
    if threshold is None:
        return out
    flagged = np.asarray(flat_r) < threshold
    y = np.asarray(flat_y, dtype=bool)
    tp = int((flagged & y).sum())
    p = tp / flagged.sum() if flagged.sum() else 0.0
    rc = tp / y.sum() if y.sum() else 0.0
    out.update(token_precision=p, token_recall=rc, token_f1=2 * p * rc / (p + rc) if p + rc else 0.0,
               worse_flagged_rate=float(flagged.mean()) if len(flagged) else None,
               better_flagged_rate=float(np.mean([x < threshold for rb in better_rewards for x in rb]))
               if any(better_rewards) else None)
    out.update(span_scores([flagged_spans(o, rw, threshold) for o, rw in zip(worse_offsets, worse_rewards)],
                           gold_spans))
    return out


def _run(rm, examples: list[RMExample], batch_size: int, desc: str) -> tuple[list[float], list[list[float]] | None]:
    """Scores of every example and, for a token RM, each one's per-position rewards."""
    raw = rm.rewards(examples, batch_size, desc=desc)
    per_token = [r.tolist() for r in raw] if rm.kind == "token" else None
    return response_scores(raw).tolist(), per_token


def flawed_token_labels(items: Sequence[Comparison], better: list[RMExample], worse: list[RMExample],
                        pairs: str, tokenizer=None) -> tuple[str | None, list[list[bool] | None]]:
    """(source, per-pair positives over the worse response's positions, None = pair not used).

    Changed tokens of a truncated pair come from the whole responses (``tokenizer`` given), as in training.
    """
    if any(c.gold_spans is not None for c in items):
        return "gold_spans", [spans_to_token_mask(w.response_offsets, c.gold_spans) if c.gold_spans is not None
                              else None for c, w in zip(items, worse)]
    if pairs == "edit":
        from .data import pair_alignment

        out: list[list[bool] | None] = []
        for c, b, w in zip(items, better, worse):
            mb, mw, _ = pair_alignment(b, w, c.better, c.worse, tokenizer)
            out.append(mw if any(mb) or any(mw) else None)
        return "edit_u1", out
    return None, [None] * len(items)


def warn_if_seen_in_training(data: str, meta: dict) -> str | None:
    """One warning line when ``data`` is a file train-rm used: its training pairs, or the held-out split that
    picked the kept weights and the flaw threshold. Returns which, or None."""
    local = os.path.exists(data)  # a `datasets` name is no file of train-rm's

    def same(path) -> bool:
        return local and bool(path) and os.path.exists(path) and os.path.samefile(path, data)

    role = ("training data" if same(meta.get("data")) else
            "held-out split (it picked the kept weights and the flaw threshold)" if same(meta.get("eval_data")) else None)
    if role:
        logger.warning("%s is the reward model's %s: these figures are not held-out", data, role)
    return role


def evaluate_reward_model(cfg: EvalRMConfig) -> dict:
    """Accuracy (and token AUROC) of ``cfg.model`` on ``cfg.data``; written to ``cfg.output`` as JSON."""
    from .data import load_comparisons_report
    from .model import RewardModel
    from ..models import load_dtype

    items, report = load_comparisons_report(cfg.data, cfg.pairs, skip_invalid=cfg.skip_invalid)
    rm = RewardModel.load(cfg.model, dtype=load_dtype(cfg.dtype, cfg.model, cfg.trust_remote_code),
                          trust_remote_code=cfg.trust_remote_code,
                          max_length=cfg.max_length)
    warn_if_seen_in_training(cfg.data, rm.meta)
    offsets = rm.kind == "token"
    better = [rm.encode(c.prompt, c.better, with_offsets=offsets) for c in items]
    worse = [rm.encode(c.prompt, c.worse, with_offsets=offsets) for c in items]
    s_better, r_better = _run(rm, better, cfg.batch_size, "eval-rm better")
    s_worse, r_worse = _run(rm, worse, cfg.batch_size, "eval-rm worse")
    margins = np.asarray(s_better) - np.asarray(s_worse)
    acc = float(np.mean((margins > 0) + 0.5 * (margins == 0)))
    n = len(items)
    result: dict = {"accuracy": acc, "accuracy_se": math.sqrt(acc * (1 - acc) / n), "n_pairs": n,
                    "ties": int((margins == 0).sum()), "mean_margin": float(margins.mean()),
                    "n_truncated": sum(b.truncated or w.truncated for b, w in zip(better, worse)),
                    "kind": rm.kind, "model": cfg.model, "data": cfg.data, "pairs": cfg.pairs,
                    # what n_pairs leaves out, as train-rm and edit count it: a reader sees the figures' coverage
                    "n_rejected": report.n_rejected, "n_dropped_unchanged": report.n_unchanged,
                    "rejects": report.rejects_path}
    if r_worse is not None and r_better is not None:
        source, labels = flawed_token_labels(items, better, worse, cfg.pairs, rm.tokenizer)
        use = [i for i, lab in enumerate(labels) if lab is not None]
        if source and use:
            threshold = cfg.flaw_threshold if cfg.flaw_threshold is not None else rm.meta.get("flaw_threshold")
            gold = [seen_spans(items[i].gold_spans, worse[i]) if source == "gold_spans" else
                    u1_spans(worse[i].response_offsets, labels[i]) for i in use]
            loc = localisation([r_worse[i] for i in use], [labels[i] for i in use],
                               [worse[i].response_offsets for i in use], gold, [r_better[i] for i in use],
                               threshold)
            if loc["token_auroc"] is not None:
                result.update(token_auroc_source=source, **loc,
                              flaw_threshold_from="--flaw-threshold" if cfg.flaw_threshold is not None else
                              (f"train-rm's {rm.meta.get('flaw_threshold_from', 'training-side pairs')}"
                               if threshold is not None else None))
    write_json(cfg.output, result)
    return result


def seen_spans(spans: Sequence[Sequence[int]], ex: RMExample) -> list[tuple[int, int]]:
    """The part of gold ``spans`` inside the response characters ``ex`` kept, as the token figures count them.

    A response cut by ``--max-length`` keeps only the characters of its kept tokens; a gold span beyond them
    can be neither flagged nor found, so the span figures leave it out as the token figures do.

    >>> seen_spans([(0, 3), (5, 9), (12, 14)], RMExample([1, 2, 3, 0], 1, 4, [(0, 3), (4, 7), (7, 7)], True))
    [(0, 3), (5, 7)]
    """
    if not ex.truncated:
        return [(int(a), int(b)) for a, b in spans]
    end = max((e for _, e in ex.response_offsets[:-1]), default=0)
    return [(int(a), min(int(b), end)) for a, b in spans if a < end]


def u1_spans(offsets: Sequence[tuple[int, int]], changed: Sequence[bool]) -> list[tuple[int, int]]:
    """Character spans of the runs of changed tokens (the edit's spans, when no gold spans are given)."""
    return flagged_spans(offsets, [-1.0 if c else 1.0 for c in changed], 0.0)
