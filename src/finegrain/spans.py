"""Character spans of a text (``[start, end)``): validating a record's list of them, merging overlaps.

Foundation: used by the data loaders, the annotation tool and the human-edits files of
:mod:`finegrain.llm.files`.
"""
from __future__ import annotations

import json
from typing import Any, Iterable

from .errors import InputError


def check_spans(value: Any, text_len: int, name: str = "gold_spans") -> tuple[list[tuple[int, int]] | None, int]:
    """Validated ``[start, end)`` spans into a text of ``text_len`` characters, sorted, overlaps merged.

    Returns ``(spans, n_merged)``. ``None`` stays ``None`` (no span information).
    """
    if value is None:
        return None, 0
    if not isinstance(value, list):
        raise InputError(f"must be a list of [start, end] pairs, got {type(value).__name__}", field=name)
    spans = []
    for i, s in enumerate(value):
        if (not isinstance(s, (list, tuple)) or len(s) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in s)):
            raise InputError(f"span {i} must be a pair of integers [start, end], got {json.dumps(s)}", field=name)
        start, end = s
        if start >= end:
            raise InputError(f"span {i} [{start}, {end}] is empty or reversed (need start < end)", field=name)
        if start < 0 or end > text_len:
            raise InputError(f"span {i} [{start}, {end}] is outside the text 'rejected' "
                             f"({text_len} characters)", field=name)
        spans.append((start, end))
    return merge_spans(spans)


def merge_spans(spans: Iterable[tuple[int, int]]) -> tuple[list[tuple[int, int]], int]:
    """Sort spans and merge overlapping ones: ``([(0, 5), (3, 8), (9, 10)]) -> ([(0, 8), (9, 10)], 1)``."""
    out: list[tuple[int, int]] = []
    merged = 0
    for start, end in sorted(spans):
        if out and start < out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
            merged += 1
        else:
            out.append((start, end))
    return out, merged


__all__ = ["check_spans", "merge_spans"]
