"""`finegrain demo`: the whole method end to end in the simulated environment (see sandbox/demo.py)."""
from __future__ import annotations

from ..config import config_command
from .config import DemoConfig


def _demo(cfg: DemoConfig) -> dict:
    from .demo import run_demo

    return run_demo(cfg)


configure, run = config_command(DemoConfig, _demo)
