"""`finegrain show-rewards`: HTML heat map of a token reward model's per-token rewards (see eval/show.py)."""
from __future__ import annotations

from ..config import config_command
from .show import ShowRewardsConfig, show_rewards

configure, run = config_command(ShowRewardsConfig, show_rewards)
