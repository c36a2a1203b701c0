"""`finegrain sft`: supervised fine-tuning of a causal LM (see sft/train.py)."""
from __future__ import annotations

from ..config import config_command
from .config import SFTConfig


def _train(cfg: SFTConfig) -> dict:
    from .train import train_sft

    return train_sft(cfg)


configure, run = config_command(SFTConfig, _train)
