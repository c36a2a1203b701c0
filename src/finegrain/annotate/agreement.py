"""Agreement between annotators of one pair, screening scores, and the export's choice among edits.

All measures use the model-free words of :mod:`finegrain.edit.distance` (the edit ratio's words):

- **changed words** of an edit: the positions of the original's words that the edit deleted or
  replaced; a pure insertion marks the word after it (position ``len(words)`` = the end), the
  convention the reward model's token alignment uses, so every real edit marks something.
  "Nothing to fix" is the empty set.
- **word agreement** of two answers: the Jaccard overlap of their changed-word sets (1 when both
  changed nothing).
- **span agreement** of two answers that both marked error spans: the Jaccard overlap of the
  marked characters. Answers without spans are left out (marking is optional).
- **action agreement** of a pair: whether all its answers chose the same action (edit or
  nothing to fix).

>>> sorted(changed_words("The cat sat on the mat .", "The dog sat on the mat ."))
[1]
>>> word_agreement(changed_words("a b c", "a x c"), changed_words("a b c", "a y c"))
1.0
>>> span_agreement([(0, 4)], [(2, 6)])
0.333333
"""
from __future__ import annotations

import itertools
from typing import Iterable, Sequence

from ..edit.distance import _TOKEN_RE, opcodes, words
from ..spans import merge_spans

Spans = Sequence[Sequence[int]]


def changed_words(original: str, edited: str | None) -> frozenset[int]:
    """Positions of ``original``'s words that ``edited`` changed (see module docstring)."""
    if edited is None:
        return frozenset()
    out: set[int] = set()
    for tag, i1, i2, _, _ in opcodes(words(original), words(edited)):
        if tag != "equal":
            out.update(range(i1, i2) if i2 > i1 else (i1,))
    return frozenset(out)


def words_in_spans(original: str, spans: Spans) -> frozenset[int]:
    """Positions of ``original``'s words that overlap any ``[start, end)`` character span."""
    out = set()
    for pos, m in enumerate(_TOKEN_RE.finditer(original)):
        if any(m.start() < e and s < m.end() for s, e in spans):
            out.add(pos)
    return frozenset(out)


def word_agreement(x: frozenset[int], y: frozenset[int]) -> float:
    """Jaccard overlap of two changed-word sets; 1.0 when both are empty."""
    union = len(x | y)
    return round(len(x & y) / union, 6) if union else 1.0


def _length(spans: Iterable[tuple[int, int]]) -> int:
    return sum(e - s for s, e in spans)


def span_agreement(a: Spans, b: Spans) -> float | None:
    """Jaccard overlap of the characters two span lists mark; None unless both mark something."""
    ma, _ = merge_spans((int(s), int(e)) for s, e in a)
    mb, _ = merge_spans((int(s), int(e)) for s, e in b)
    if not ma or not mb:
        return None
    inter, i, j = 0, 0, 0
    while i < len(ma) and j < len(mb):
        lo, hi = max(ma[i][0], mb[j][0]), min(ma[i][1], mb[j][1])
        inter += max(0, hi - lo)
        if ma[i][1] < mb[j][1]:
            i += 1
        else:
            j += 1
    union = _length(ma) + _length(mb) - inter
    return round(inter / union, 6)


def _mean(xs: Sequence[float]) -> float | None:
    return round(sum(xs) / len(xs), 6) if xs else None


def pair_agreement(original: str, answers: Sequence[dict]) -> dict:
    """Agreement of the answers to one pair; each answer has ``action`` ('submit' | 'nothing'),
    ``edited`` and ``spans`` (list of ``[start, end, type]``)."""
    sets = [changed_words(original, a["edited"] if a["action"] == "submit" else None) for a in answers]
    word = [word_agreement(x, y) for x, y in itertools.combinations(sets, 2)]
    spans = [span_agreement([s[:2] for s in a["spans"]], [s[:2] for s in b["spans"]])
             for a, b in itertools.combinations(answers, 2)]
    spans = [s for s in spans if s is not None]
    return {"n_answers": len(answers), "word_agreement": _mean(word), "span_agreement": _mean(spans),
            "n_span_comparisons": len(spans), "same_action": len({a["action"] for a in answers}) == 1,
            "pairwise_word": word}


def consensus_index(original: str, edits: Sequence[str]) -> int:
    """Index of the edit whose changed words agree best (mean Jaccard) with the other edits; ties go to
    the first (callers pass edits in submission order)."""
    if len(edits) <= 1:
        return 0
    sets = [changed_words(original, e) for e in edits]
    scores = [sum(word_agreement(s, t) for j, t in enumerate(sets) if j != i) / (len(sets) - 1)
              for i, s in enumerate(sets)]
    return max(range(len(edits)), key=lambda i: (scores[i], -i))


def screening_score(expected: dict, original: str, action: str, edited: str | None, spans: Spans,
                    edit_ratio: float | None, max_edit_ratio: float) -> dict:
    """Score one answer to a screening item against its known answer.

    - expected "nothing to fix": passed when the answer is "nothing to fix" (score 1 or 0);
    - expected flaws (an expected edit and/or gold spans): the expected words are those the
      expected edit changes plus those the gold spans cover; the answer's words are those its
      edit changes plus those its marked spans cover. ``score`` is the share of the expected words
      the answer found (recall); passed when the answer is an edit with score >= 0.5 and an edit
      ratio within ``max_edit_ratio``.
    """
    if expected.get("nothing_to_fix"):
        ok = action == "nothing"
        return {"passed": ok, "score": 1.0 if ok else 0.0}
    want = changed_words(original, expected.get("edited")) | words_in_spans(original, expected.get("gold_spans") or [])
    if action != "submit" or not want:
        return {"passed": False, "score": 0.0}
    got = changed_words(original, edited) | words_in_spans(original, [s[:2] for s in spans])
    score = round(len(want & got) / len(want), 6)
    return {"passed": score >= 0.5 and (edit_ratio or 0.0) <= max_edit_ratio, "score": score}


__all__ = ["changed_words", "consensus_index", "pair_agreement", "screening_score", "span_agreement",
           "word_agreement", "words_in_spans"]
