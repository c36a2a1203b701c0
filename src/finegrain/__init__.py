"""finegrain: fine-grained RLHF (Xu et al., ACL 2024) on the Hugging Face stack.

Public API (each CLI verb is a thin layer over one of these):

- data:  ``load_pairs``, ``convert``, ``PreferencePair``, ``EditedPair``
- rm:    ``align_tokens``, ``train_reward_model``, ``evaluate_reward_model``, ``RewardModel``
- ppo:   ``train_ppo``
- edit:  ``edit_pairs``
- eval:  ``generate``, ``winrate``
- sft:   ``train_sft``
- sandbox: ``run_demo``

Names are imported lazily so that ``import finegrain`` does not import torch.
"""
from __future__ import annotations

from ._lazy import lazy_exports

__version__ = "0.1.0"

_LAZY = {
    "load_pairs": "finegrain.data",
    "convert": "finegrain.data",
    "PreferencePair": "finegrain.data",
    "EditedPair": "finegrain.data",
    "align_tokens": "finegrain.rm",
    "train_reward_model": "finegrain.rm",
    "evaluate_reward_model": "finegrain.rm",
    "RewardModel": "finegrain.rm",
    "train_ppo": "finegrain.ppo",
    "edit_pairs": "finegrain.edit",
    "generate": "finegrain.eval",
    "winrate": "finegrain.eval",
    "train_sft": "finegrain.sft",
    "run_demo": "finegrain.sandbox",
}

__all__ = sorted(_LAZY) + ["__version__"]
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
