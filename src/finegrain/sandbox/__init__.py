"""The sandbox: a simulated RLHF environment with a token-level gold truth (see domain.py), its
simulated annotators, oracle editor and gold judge, and `finegrain demo`."""
from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {"run_demo": "demo", "DemoConfig": "config", "gold_score": "domain", "oracle_edit": "oracle",
            "SandboxEditor": "backends", "SandboxJudge": "backends"}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
