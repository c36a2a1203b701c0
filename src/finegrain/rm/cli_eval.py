"""`finegrain eval-rm`: pairwise accuracy and token AUROC of a reward model (see rm/evaluate.py)."""
from __future__ import annotations

from ..config import config_command
from .config import EvalRMConfig


def _evaluate(cfg: EvalRMConfig) -> dict:
    from .evaluate import evaluate_reward_model

    return evaluate_reward_model(cfg)


configure, run = config_command(EvalRMConfig, _evaluate)
