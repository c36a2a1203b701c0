"""Supervised fine-tuning: `finegrain sft` as functions (imported lazily; no torch at import)."""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SFTConfig": "config", "train_sft": "train", "SFTRecord": "data", "load_sft_records": "data",
    "SFTExample": "data", "build_sft_example": "data", "SFTBatch": "data", "collate_sft": "data",
    "response_loss": "train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
