"""PPO for language models with sequence-level or token-level (fine-grained) rewards.

- :mod:`finegrain.ppo.core`: the math (GAE, clipped losses, KL estimators, reward assembly)
- :mod:`finegrain.ppo.rewards`: reward-model scoring and cross-tokenizer reward mapping
- :mod:`finegrain.ppo.rollout`: the Rollout dataclass and its stages
- :mod:`finegrain.ppo.train`: ``train_ppo(cfg, on_rollout=None)``, the loop and checkpoints
- :mod:`finegrain.ppo.config`: ``PPOConfig`` (every option with help text)

Import the heavy parts from their modules; this package import stays light.
"""
from .config import PPOConfig

__all__ = ["PPOConfig", "load_value_head", "train_ppo"]


def train_ppo(cfg, **kw):
    """See :func:`finegrain.ppo.train.train_ppo`."""
    from .train import train_ppo as _train_ppo

    return _train_ppo(cfg, **kw)


def load_value_head(model_dir):
    """See :func:`finegrain.ppo.rollout.load_value_head`."""
    from .rollout import load_value_head as _load_value_head

    return _load_value_head(model_dir)
