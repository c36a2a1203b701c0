"""Reward-model evaluation: `finegrain eval-rm` as a function.

- ``accuracy``: fraction of pairs where the better response scores higher (ties count 1/2),
  with its binomial standard error; a token RM scores a response by Eq. 1 (mean reward).
- ``token_auroc`` (token RMs): how well a LOW token reward finds the flawed tokens of the worse
  response. Positives are the gold flawed tokens when the data carries ``gold_spans``
  (``token_auroc_source = "gold_spans"``), else, for edit pairs, the changed (U1) tokens of the
  rejected response (``"edit_u1"``). Score = -reward; rank-based AUROC with ties.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..data.schema import Comparison
from ..io import write_json
from ..tracking import progress
from .align import align_tokens, spans_to_token_mask
from .config import EvalRMConfig
from .inputs import RMExample


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


def _run(rm, examples: list[RMExample], batch_size: int, desc: str) -> tuple[list[float], list[list[float]] | None]:
    """Scores of every example and, for a token RM, each one's per-position rewards."""
    from .losses import mean_reward

    scores: list[float] = [0.0] * len(examples)
    per_token: list[list[float]] | None = [[] for _ in examples] if rm.kind == "token" else None
    bar = progress(total=len(examples), desc=desc)
    for idx, chunk in rm.iter_batches(examples, batch_size):
        rewards, mask = rm.forward_batch(chunk)
        s = mean_reward(rewards, mask) if rm.kind == "token" else rewards.sum(-1)
        for row, i in enumerate(idx):
            scores[i] = float(s[row])
            if per_token is not None:
                per_token[i] = rewards[row, chunk[row].response_start:chunk[row].response_end].tolist()
        bar.update(len(idx))
    bar.close()
    return scores, per_token


def flawed_token_labels(items: Sequence[Comparison], better: list[RMExample], worse: list[RMExample],
                        pairs: str) -> tuple[str | None, list[list[bool] | None]]:
    """(source, per-pair positives over the worse response's positions, None = pair not used)."""
    if any(c.gold_spans is not None for c in items):
        return "gold_spans", [spans_to_token_mask(w.response_offsets, c.gold_spans) if c.gold_spans is not None
                              else None for c, w in zip(items, worse)]
    if pairs == "edit":
        out: list[list[bool] | None] = []
        for b, w in zip(better, worse):
            al = align_tokens(w.response_ids, b.response_ids)
            out.append(None if al.identical else al.changed_original)
        return "edit_u1", out
    return None, [None] * len(items)


def evaluate_reward_model(cfg: EvalRMConfig) -> dict:
    """Accuracy (and token AUROC) of ``cfg.model`` on ``cfg.data``; written to ``cfg.output`` as JSON."""
    from .data import load_comparisons
    from .model import RewardModel
    from .train import DTYPES

    items = load_comparisons(cfg.data, cfg.pairs, skip_invalid=cfg.skip_invalid)
    rm = RewardModel.load(cfg.model, dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code,
                          max_length=cfg.max_length)
    offsets = rm.kind == "token"
    better = [rm.encode(c.prompt, c.better, with_offsets=offsets) for c in items]
    worse = [rm.encode(c.prompt, c.worse, with_offsets=offsets) for c in items]
    s_better, _ = _run(rm, better, cfg.batch_size, "eval-rm better")
    s_worse, r_worse = _run(rm, worse, cfg.batch_size, "eval-rm worse")
    margins = np.asarray(s_better) - np.asarray(s_worse)
    acc = float(np.mean((margins > 0) + 0.5 * (margins == 0)))
    n = len(items)
    result: dict = {"accuracy": acc, "accuracy_se": math.sqrt(acc * (1 - acc) / n), "n_pairs": n,
                    "ties": int((margins == 0).sum()), "mean_margin": float(margins.mean()),
                    "n_truncated": sum(b.truncated or w.truncated for b, w in zip(better, worse)),
                    "kind": rm.kind, "model": cfg.model, "data": cfg.data, "pairs": cfg.pairs}
    if r_worse is not None:
        source, labels = flawed_token_labels(items, better, worse, cfg.pairs)
        scores = [-r for lab, rw in zip(labels, r_worse) if lab is not None for r in rw]
        flat = [x for lab in labels if lab is not None for x in lab]
        value = auroc(scores, flat) if source else None
        if value is not None:
            result.update(token_auroc=value, token_auroc_source=source, token_auroc_n_pos=int(sum(flat)),
                          token_auroc_n_tokens=len(flat))
    write_json(cfg.output, result)
    return result
