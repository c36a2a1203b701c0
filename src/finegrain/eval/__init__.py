"""Evaluation: generate outputs, pairwise win rates with an LLM (or human, or gold) judge, token-reward pages.

``generate`` and ``winrate`` are imported eagerly (neither module imports torch or an LLM SDK at
import time): each function shares its name with its module, and importing a submodule binds
the package attribute to the module, so a lazy lookup would hand back the module instead of the
function once anyone had imported ``finegrain.eval.generate``. The other names are resolved
lazily (module ``__getattr__``), so a missing sibling module breaks only its own names.
"""
from __future__ import annotations

from .._lazy import lazy_exports

from .generate import GenerateConfig, generate  # noqa: F401 - binds the function over the submodule of that name
from .winrate import WinrateConfig, winrate, winrate_stats  # noqa: F401

_LAZY = {
    "show_rewards": "finegrain.eval.show",
    "ShowRewardsConfig": "finegrain.eval.show",
    "token_reward_html": "finegrain.eval.show",
}

__all__ = sorted(["generate", "GenerateConfig", "winrate", "WinrateConfig", "winrate_stats", *_LAZY])
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
