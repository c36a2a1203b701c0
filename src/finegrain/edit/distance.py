"""How much an edit changed a response, measured without any model's tokenizer.

Text is split into words (``\\w+`` runs) and single punctuation marks, whitespace dropped, so
the measure is the same whichever LLM made the edit. The two token lists are aligned with
``difflib.SequenceMatcher`` (autojunk off, the alignment DESIGN.md decision 1 uses for model
tokens), and

    edit_ratio = (deleted + inserted tokens) / (len(original) + len(edited))      (in [0, 1])

(``changed_tokens`` reports the other common count: each non-equal block costs
``max(deleted, inserted)``.)

0 means unchanged, 1 means nothing in common. A whole new paragraph appended to a short answer
scores near 1, a one-word fix in a long answer near 0.

>>> words("Paris, France's capital.")
['Paris', ',', 'France', "'", 's', 'capital', '.']
>>> edit_stats("The cat sat.", "The dog sat.")["edit_ratio"]
0.25
"""
from __future__ import annotations

import difflib
import re
from typing import Any, Sequence

_TOKEN_RE = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def words(text: str) -> list[str]:
    """Model-free tokens: runs of word characters and single punctuation marks."""
    return _TOKEN_RE.findall(text)


def opcodes(a: Sequence[str], b: Sequence[str]) -> list[tuple[str, int, int, int, int]]:
    """difflib opcodes (tag, i1, i2, j1, j2) aligning ``a`` to ``b`` with autojunk off."""
    return difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes()


def edit_stats(original: str, edited: str) -> dict[str, Any]:
    """Token counts and the edit ratio of ``edited`` against ``original`` (see module docstring)."""
    a, b = words(original), words(edited)
    deleted = inserted = changed = blocks = 0
    for tag, i1, i2, j1, j2 in opcodes(a, b):
        if tag == "equal":
            continue
        blocks += 1
        deleted += i2 - i1
        inserted += j2 - j1
        changed += max(i2 - i1, j2 - j1)
    denom = len(a) + len(b)
    return {
        "original_tokens": len(a),
        "edited_tokens": len(b),
        "tokens_deleted": deleted,
        "tokens_inserted": inserted,
        "changed_tokens": changed,
        "changed_blocks": blocks,
        "edit_ratio": round((deleted + inserted) / denom, 6) if denom else 0.0,
    }


def percentiles(values: Sequence[float], qs: Sequence[float] = (10, 25, 50, 75, 90, 95, 99)) -> dict[str, float]:
    """Linear-interpolation percentiles (numpy's default method), keyed ``p50`` etc."""
    xs = sorted(values)
    if not xs:
        return {}
    out = {}
    for q in qs:
        pos = (len(xs) - 1) * q / 100
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        out[f"p{q:g}"] = round(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo), 4)
    return out
