"""Reward models: token alignment (U0/U1), the three losses, training, evaluation, scoring.

Names are imported lazily so that `finegrain train-rm --help` does not load torch.
"""
from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {
    "align_tokens": "align", "spans_to_token_mask": "align", "TokenAlignment": "align",
    "TrainRMConfig": "config", "EvalRMConfig": "config",
    "train_reward_model": "train", "evaluate_reward_model": "evaluate", "auroc": "evaluate",
    "RewardModel": "model", "TokenRewards": "model", "RMBatch": "model", "ensure_distinct_pad": "model",
    "reward_model_kind": "model", "rm_forward": "scorer",
    "RMExample": "inputs", "build_rm_example": "inputs",
    "sequence_loss": "losses", "token_mean_loss": "losses", "token_edit_loss": "losses",
    "token_mean_margin": "losses", "token_edit_margin": "losses", "mean_reward": "losses",
    "bradley_terry": "losses", "u0_consistency": "losses",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
