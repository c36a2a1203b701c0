"""The sandbox: a simulated RLHF environment with a token-level gold truth (see domain.py), its
simulated annotators, oracle editor and gold judge, and `finegrain demo`."""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"run_demo": "demo", "DemoConfig": "config", "gold_score": "domain", "oracle_edit": "oracle",
            "SandboxEditor": "backends", "SandboxJudge": "backends"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
