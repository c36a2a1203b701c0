"""`finegrain train-rm`: train a sequence or token-level reward model (see rm/train.py)."""
from __future__ import annotations

from ..config import config_command
from .config import TrainRMConfig


def _train(cfg: TrainRMConfig) -> dict | None:
    from accelerate import PartialState

    from .train import train_reward_model

    summary = train_reward_model(cfg)
    return summary if PartialState().is_main_process else None  # one JSON summary under `accelerate launch`


configure, run = config_command(TrainRMConfig, _train)
