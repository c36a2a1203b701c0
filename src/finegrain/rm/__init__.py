"""Reward models: token alignment (U0/U1), the three losses, training, evaluation, scoring.

Names are imported lazily so that `finegrain train-rm --help` does not load torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "align_tokens": "align", "spans_to_token_mask": "align", "TokenAlignment": "align",
    "TrainRMConfig": "config", "EvalRMConfig": "config",
    "train_reward_model": "train", "evaluate_reward_model": "evaluate", "auroc": "evaluate",
    "RewardModel": "model", "TokenRewards": "model", "RMBatch": "model", "ensure_distinct_pad": "model",
    "RMExample": "inputs", "build_rm_example": "inputs",
    "sequence_loss": "losses", "token_mean_loss": "losses", "token_edit_loss": "losses",
    "token_mean_margin": "losses", "token_edit_margin": "losses", "mean_reward": "losses",
    "bradley_terry": "losses", "u0_consistency": "losses",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
