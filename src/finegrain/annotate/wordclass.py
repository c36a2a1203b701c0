"""The word splitting of :mod:`finegrain.edit.distance`, handed to the page's JavaScript.

``distance`` splits text with Python's ``\\w+|[^\\w\\s]``. JavaScript's ``\\w`` is ASCII only and
its ``\\s`` is a different set, so the page builds the same regex from the exact character sets
of the running Python's ``\\w`` and ``\\s`` (read from Python's own regex engine here), written as
JavaScript character-class ranges for a regex with the ``u`` flag. The page's edit ratio then
equals :func:`~finegrain.edit.distance.edit_stats` on every text, Unicode included.
"""
from __future__ import annotations

import functools
import re

from ..edit.distance import _TOKEN_RE

# The shape of distance's regex that the page's tokenizer mirrors (static/diff.js, makeTokenizer).
MIRRORED_PATTERN = r"\w+|[^\w\s]"


def _ranges(pattern: str, sample: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end() - 1) for m in re.finditer(pattern, sample, _TOKEN_RE.flags)]


def _js_class(ranges: list[tuple[int, int]]) -> str:
    return "".join(f"\\u{{{a:x}}}" if a == b else f"\\u{{{a:x}}}-\\u{{{b:x}}}" for a, b in ranges)


@functools.lru_cache(maxsize=1)
def char_classes() -> dict[str, str]:
    """``{"word": ..., "space": ...}``: JS class bodies equal to Python's ``\\w`` and ``\\s``."""
    if _TOKEN_RE.pattern != MIRRORED_PATTERN:  # pragma: no cover - guards a change in distance.py
        raise RuntimeError("finegrain.edit.distance changed its word regex: update static/diff.js to match")
    # one character per code point (surrogates, never in valid text, stand in as "!": neither class)
    sample = "".join("!" if 0xD800 <= c <= 0xDFFF else chr(c) for c in range(0x110000))
    return {"word": _js_class(_ranges(r"\w+", sample)), "space": _js_class(_ranges(r"\s+", sample))}


__all__ = ["MIRRORED_PATTERN", "char_classes"]
