"""Data collection by minimal editing: editor/judge backends, guards, cache, and ``edit_pairs``.

Names are imported lazily so that ``import finegrain.edit`` stays light (no SDK, no torch).
"""
from __future__ import annotations

from .._lazy import lazy_exports

_LAZY = {
    "edit_pairs": "finegrain.edit.core",
    "EditConfig": "finegrain.edit.core",
    "EditRequest": "finegrain.edit.backends",
    "EditResult": "finegrain.edit.backends",
    "JudgeRequest": "finegrain.edit.backends",
    "JudgeResult": "finegrain.edit.backends",
    "EditorBackend": "finegrain.edit.backends",
    "JudgeBackend": "finegrain.edit.backends",
    "get_editor": "finegrain.edit.backends",
    "get_judge": "finegrain.edit.backends",
    "edit_stats": "finegrain.edit.distance",
    "load_prompt": "finegrain.edit.prompts",
}

__all__ = sorted(_LAZY)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
