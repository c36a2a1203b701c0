"""`finegrain ppo`: PPO with sequence-level or token-level rewards (a thin layer over train_ppo)."""
from __future__ import annotations

from ..config import config_command
from .config import PPOConfig


def _run(cfg: PPOConfig) -> dict | None:
    import os

    from .train import train_ppo  # torch is imported only when the verb runs

    summary = train_ppo(cfg)
    return summary if os.environ.get("RANK", "0") == "0" else None  # one summary under accelerate launch


configure, run = config_command(PPOConfig, _run)
