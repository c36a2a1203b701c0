"""``finegrain generate``: a checkpoint's outputs for a prompt set (see :mod:`finegrain.eval.generate`)."""
from __future__ import annotations

from ..config import config_command
from .generate import GenerateConfig, generate

configure, run = config_command(GenerateConfig, generate)
