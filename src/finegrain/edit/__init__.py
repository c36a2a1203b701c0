"""Data collection by minimal editing: guards, edit statistics and ``edit_pairs`` (editors and judges
themselves are in :mod:`finegrain.llm`).

Names are imported lazily so that ``import finegrain.edit`` stays light (no SDK, no torch).
"""
from __future__ import annotations

from .._lazy import lazy_exports

_LAZY = {
    "edit_pairs": "finegrain.edit.core",
    "EditConfig": "finegrain.edit.core",
    "edit_stats": "finegrain.edit.distance",
}

__all__ = sorted(_LAZY)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
