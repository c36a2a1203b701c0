"""The reward-model losses (reference/paper.md Eq. 1-4; DESIGN.md decision 2), as pure functions.

:data:`LOSSES` is the one list of ``--loss`` names: each name's reward-model kind, its help text
and its pairwise term, read by the options (rm/config.py) and by training (rm/train.py). The
per-token label term (:func:`token_label_loss`) is ``token_label`` itself and can also be added
to a Bradley-Terry token loss with a weight (``--label-weight``).

Shapes: B pairs; L padded sequence length. ``rewards_*`` are per-position rewards of a token
RM, ``mask_*`` mark the response positions of each row (response tokens + closing token: the
T of Eq. 1), ``u1_*`` mark the changed (U1) positions, a subset of the mask. Each side of a pair
may have its own layout (masks), so better and worse are passed separately. Every loss is the
mean over the batch of -log sigma(margin); the ``*_margin`` functions give that margin.

torch is imported by the functions that call it, so that the option modules can read
:data:`LOSSES` without it (``--help`` stays fast).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch


def bradley_terry(margin: torch.Tensor) -> torch.Tensor:
    """-E[log sigma(margin)] over the batch (Eq. 2 as a negative log-likelihood).  (B,) -> ()"""
    import torch.nn.functional as F

    return -F.logsigmoid(margin).mean()


def mean_reward(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 1: R = (1/T) sum_t r_t over the masked positions of each row.  (B, L), (B, L) -> (B,)"""
    m = mask.to(rewards.dtype)
    return (rewards * m).sum(-1) / m.sum(-1).clamp_min(1.0)


def sequence_loss(score_better: torch.Tensor, score_worse: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry on one score per response (last-token score of a sequence RM).  (B,), (B,) -> ()"""
    return bradley_terry(score_better - score_worse)


def token_mean_margin(rewards_better: torch.Tensor, mask_better: torch.Tensor,
                      rewards_worse: torch.Tensor, mask_worse: torch.Tensor) -> torch.Tensor:
    """R(better) - R(worse) with R = Eq. 1.  (B, Lb), (B, Lb), (B, Lw), (B, Lw) -> (B,)"""
    return mean_reward(rewards_better, mask_better) - mean_reward(rewards_worse, mask_worse)


def token_mean_loss(rewards_better: torch.Tensor, mask_better: torch.Tensor,
                    rewards_worse: torch.Tensor, mask_worse: torch.Tensor) -> torch.Tensor:
    """Eq. 1-3: Bradley-Terry on the mean token reward of each response.  -> ()

    Eq. 3 is this loss rewritten under the assumption that U0 tokens get equal rewards on both
    sides; computed this way it needs no such assumption.
    """
    return bradley_terry(token_mean_margin(rewards_better, mask_better, rewards_worse, mask_worse))


def token_edit_margin(rewards_better: torch.Tensor, mask_better: torch.Tensor, u1_better: torch.Tensor,
                      rewards_worse: torch.Tensor, mask_worse: torch.Tensor, u1_worse: torch.Tensor) -> torch.Tensor:
    """Eq. 4's margin: (1/T_i) sum_{U1} r^i - (1/T_j) sum_{U1} r^j, T = each side's full length.  -> (B,)"""
    def side(r: torch.Tensor, mask: torch.Tensor, u1: torch.Tensor) -> torch.Tensor:
        u = (u1.bool() & mask.bool()).to(r.dtype)                        # (B, L)
        return (r * u).sum(-1) / mask.to(r.dtype).sum(-1).clamp_min(1.0)  # (B,)

    return side(rewards_better, mask_better, u1_better) - side(rewards_worse, mask_worse, u1_worse)


def token_edit_loss(rewards_better: torch.Tensor, mask_better: torch.Tensor, u1_better: torch.Tensor,
                    rewards_worse: torch.Tensor, mask_worse: torch.Tensor, u1_worse: torch.Tensor) -> torch.Tensor:
    """Eq. 4: Bradley-Terry on U1 tokens only, each side divided by its own length T.  -> ()

    U0 tokens do not enter the loss, so its gradient on their rewards is exactly zero.
    """
    return bradley_terry(token_edit_margin(rewards_better, mask_better, u1_better,
                                           rewards_worse, mask_worse, u1_worse))


def u0_consistency(rewards_better: torch.Tensor, index_better: torch.Tensor, rewards_worse: torch.Tensor,
                   index_worse: torch.Tensor, pair_mask: torch.Tensor) -> torch.Tensor:
    """Optional regulariser: mean squared gap between the rewards of aligned unchanged (U0) tokens.

    Eq. 3 -> Eq. 4 assumes that a U0 token gets the same reward in both responses; this term asks
    for it. index_*: (B, K) positions of the k-th aligned U0 token pair in each row; pair_mask:
    (B, K) 1 where the pair exists.  -> ()
    """
    gap = rewards_better.gather(1, index_better) - rewards_worse.gather(1, index_worse)   # (B, K)
    m = pair_mask.to(gap.dtype)
    return (gap.pow(2) * m).sum() / m.sum().clamp_min(1.0)


def edit_token_labels(response_mask: torch.Tensor, u1_mask: torch.Tensor, n_better: int,
                      u0_target: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token targets and weights that an edit implies; rows [0, n_better) are the better (edited) side.

    A target is P(this token is good):
      - 0 on the changed (U1) tokens of the worse response (what the editor replaced),
      - 1 on the U1 tokens of the better response (what the editor wrote),
      - ``u0_target`` on the unchanged (U0) tokens of both (1 = "the editor kept them, so they are
        fine"; 0.5 = neutral; None = unlabelled, weight 0).
    (2B, L) masks -> (2B, L) targets, (2B, L) weights (0 outside the response).

    >>> import torch
    >>> t, w = edit_token_labels(torch.tensor([[1, 1, 0], [1, 1, 1]]), torch.tensor([[0, 1, 0], [1, 0, 0]]), 1, 0.5)
    >>> t.tolist(), w.tolist()
    ([[0.5, 1.0, 0.0], [0.0, 0.5, 0.5]], [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    """
    import torch

    resp, u1 = response_mask.bool(), u1_mask.bool() & response_mask.bool()
    u0 = resp & ~u1
    better = torch.zeros_like(resp)
    better[:n_better] = True
    targets = torch.where(u1, better.to(torch.float32), torch.full(resp.shape, u0_target or 0.0, device=resp.device))
    weights = u1.to(torch.float32) + (u0.to(torch.float32) if u0_target is not None else 0.0)
    return targets * resp, weights


def token_label_loss(rewards: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-token labels as a classifier: weighted mean binary cross-entropy of sigmoid(r_t) against the targets.

    r_t is then the log-odds that token t is good: a flawed token gets a negative reward, a good one a
    positive reward, so a LOW reward points at the tokens the editor changed.  (B, L) x 3 -> ()
    """
    import torch.nn.functional as F

    bce = F.binary_cross_entropy_with_logits(rewards, targets.to(rewards.dtype), reduction="none")
    w = weights.to(rewards.dtype)
    return (bce * w).sum() / w.sum().clamp_min(1.0)


# ---------------------------------------------------------------- the names of --loss
PairTerm = Callable[["torch.Tensor", "torch.Tensor", "torch.Tensor", int], "torch.Tensor"]


@dataclass(frozen=True)
class Loss:
    """One ``--loss``: the reward-model kind it trains, its help text and its pairwise term.

    ``pair_term(outputs, response_mask, u1_mask, n_better) -> ()`` on one batch of both sides,
    rows [0, n_better) better and the rest worse (outputs: (2B,) scores of a sequence RM, (2B, L)
    token rewards of a token RM); ``None`` for a loss without one, whose whole objective is the
    per-token label term (``labels``).
    """

    kind: str
    help: str
    pair_term: PairTerm | None
    labels: bool = False


def _sequence_term(outputs, response_mask, u1_mask, b: int):
    return sequence_loss(outputs[:b], outputs[b:])


def _token_mean_term(outputs, resp, u1, b: int):
    return token_mean_loss(outputs[:b], resp[:b], outputs[b:], resp[b:])


def _token_edit_term(outputs, resp, u1, b: int):
    return token_edit_loss(outputs[:b], resp[:b], u1[:b], outputs[b:], resp[b:], u1[b:])


LOSSES: dict[str, Loss] = {
    "sequence": Loss("sequence", "Bradley-Terry on the last-token score", _sequence_term),
    "token_mean": Loss("token", "Eq. 1-3, BT on the mean token reward", _token_mean_term),
    "token_edit": Loss("token", "Eq. 4, changed (U1) tokens only, each side divided by its own length",
                       _token_edit_term),
    "token_label": Loss("token", "the edit as per-token labels, a token classifier (changed tokens of the rejected "
                                 "side bad, of the edited side good, unchanged ones per --u0-label)", None, labels=True),
}
"""``--loss`` name -> :class:`Loss`, in the order ``--help`` lists them."""


def loss_names(*, kind: str | None = None, pairwise: bool | None = None) -> list[str]:
    """The ``--loss`` names, optionally only those of one reward-model ``kind`` / with(out) a pairwise term.

    >>> loss_names(kind="token", pairwise=True)
    ['token_mean', 'token_edit']
    """
    return [name for name, spec in LOSSES.items() if (kind is None or spec.kind == kind)
            and (pairwise is None or (spec.pair_term is not None) == pairwise)]
