"""Supervised fine-tuning: `finegrain sft` as functions (imported lazily; no torch at import)."""
from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {
    "SFTConfig": "config", "train_sft": "train", "SFTRecord": "data", "load_sft_records": "data",
    "SFTExample": "data", "build_sft_example": "data", "SFTBatch": "data", "collate_sft": "data",
    "response_loss": "train",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
