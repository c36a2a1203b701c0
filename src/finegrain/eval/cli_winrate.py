"""``finegrain winrate``: pairwise win rate against reference outputs (see :mod:`finegrain.eval.winrate`)."""
from __future__ import annotations

from ..config import config_command
from .winrate import WinrateConfig, winrate

configure, run = config_command(WinrateConfig, winrate)
