"""Token alignment of an original response and its minimal edit: which tokens changed (U1).

DESIGN.md decision 1. The two token id lists are diffed with a longest-matching-block diff
(``difflib.SequenceMatcher(autojunk=False)``). Every non-equal block marks its tokens on each
side as changed (U1). Where one side of a block is empty (a pure insertion or deletion), that
side marks the single token at the divergence point: the token that FOLLOWS the edit. Responses
end with their closing token (EOS/SEP, see ``rm/inputs.py``), so that token always exists for an
edit at the very end; if a caller passes ids without a closing token, the last token stands in.

Repeats: deleting one of two adjacent copies ("A A B" -> "A B") can be aligned either way, and the
diff takes the first copy. The later copy is the repeat, and the only one a causal reward model can
tell is one (at the first it has not seen the second), so a pure deletion or insertion that repeats
right after itself is moved onto its later copy (``later_copies``; the deleted words stay the same).

Coincidental matches: when an edit rewrites a stretch (an unsafe sentence replaced by a good
one), the diff matches the few common tokens inside it ("the", ".") and would call them
unchanged. An unchanged run strictly shorter than the changes on both sides of it is absorbed
into the change (``absorb_coincidences``; the semantic clean-up of Myers' diff-match-patch, with a
strict comparison so that two one-token fixes one token apart keep that token unchanged).

Consequences: identical responses have no U1 token; any two different responses have at least
one U1 token on each side (when both are non-empty). U0 is every other response token.

``spans_to_token_mask`` maps character spans (gold flawed spans, human highlights) onto tokens
through their character offsets.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Sequence


@dataclass
class TokenAlignment:
    """U1 marks of both sides of an (original, edited) pair.

    changed_original:  one bool per original token, True = U1 (changed)
    changed_edited:    one bool per edited token, True = U1
    opcodes:           difflib opcodes (tag, i1, i2, j1, j2), original = a, edited = b
    """

    changed_original: list[bool]
    changed_edited: list[bool]
    opcodes: list[tuple[str, int, int, int, int]]

    @property
    def identical(self) -> bool:
        return all(op[0] == "equal" for op in self.opcodes)


def _mark(marks: list[bool], lo: int, hi: int) -> None:
    """Mark [lo, hi) or, for an empty range, the token at the divergence point ``lo``."""
    if not marks:
        return
    if hi > lo:
        for k in range(lo, hi):
            marks[k] = True
    else:
        marks[min(lo, len(marks) - 1)] = True


Opcode = tuple[str, int, int, int, int]


def _period(block: Sequence[int]) -> int:
    """The smallest p with block[i] == block[i + p] for all i: shifting the block by p keeps its content."""
    return next(p for p in range(1, len(block) + 1) if all(block[i] == block[i + p] for i in range(len(block) - p)))


def later_copies(opcodes: Sequence[Opcode], a: Sequence[int], b: Sequence[int]) -> list[Opcode]:
    """Move each pure deletion (of ``a``) and insertion (into ``b``) onto the later copy while the same
    tokens follow it, by whole periods of the block, so that it removes (adds) the same tokens; the equal
    block after it keeps at least one token (the closing one stays unchanged).

    >>> later_copies([("delete", 0, 2, 0, 0), ("equal", 2, 5, 0, 3)], [7, 8, 7, 8, 0], [7, 8, 0])
    [('equal', 0, 2, 0, 2), ('delete', 2, 4, 2, 2), ('equal', 4, 5, 2, 3)]
    >>> later_copies([("delete", 0, 2, 0, 0), ("equal", 2, 5, 0, 3)], [7, 8, 7, 9, 0], [7, 9, 0])[0]
    ('delete', 0, 2, 0, 0)
    """
    out: list[Opcode] = []
    ops = [tuple(op) for op in opcodes]
    for k, op in enumerate(ops):
        nxt = ops[k + 1] if k + 1 < len(ops) else None
        if op[0] in ("delete", "insert") and nxt is not None and nxt[0] == "equal":
            seq, lo, hi = (a, op[1], op[2]) if op[0] == "delete" else (b, op[3], op[4])
            p, s = _period(seq[lo:hi]), 0
            while nxt[2] - nxt[1] - s - p >= 1 and seq[hi + s:hi + s + p] == seq[lo + s:lo + s + p]:
                s += p
            if s:
                tag, i1, i2, j1, j2 = op
                if out and out[-1][0] == "equal":
                    prev = out.pop()
                    out.append(("equal", prev[1], i1 + s, prev[3], j1 + s))
                else:
                    out.append(("equal", i1, i1 + s, j1, j1 + s))
                out.append((tag, i1 + s, i2 + s, j1 + s, j2 + s))
                ops[k + 1] = ("equal", nxt[1] + s, nxt[2], nxt[3] + s, nxt[4])
                continue
        out.append(op)
    return out  # type: ignore[return-value]


def absorb_coincidences(opcodes: Sequence[Opcode]) -> list[Opcode]:
    """Merge every equal block shorter than the changed blocks on both of its sides into one ``replace``.

    The size of a changed block is its longer side. Repeated until nothing merges (a merge makes
    its block larger, which can absorb the equal block on either side of it).

    >>> absorb_coincidences([("replace", 0, 3, 0, 4), ("equal", 3, 4, 4, 5), ("replace", 4, 6, 5, 8)])
    [('replace', 0, 6, 0, 8)]
    >>> absorb_coincidences([("replace", 0, 1, 0, 1), ("equal", 1, 2, 1, 2), ("replace", 2, 3, 2, 3)])[1]
    ('equal', 1, 2, 1, 2)
    """
    ops = [tuple(op) for op in opcodes]
    size = lambda op: max(op[2] - op[1], op[4] - op[3])  # noqa: E731
    k = 1
    while k < len(ops) - 1:
        left, mid, right = ops[k - 1], ops[k], ops[k + 1]
        if mid[0] == "equal" and left[0] != "equal" and right[0] != "equal" \
                and size(mid) < min(size(left), size(right)):
            ops[k - 1:k + 2] = [("replace", left[1], right[2], left[3], right[4])]
            k = max(1, k - 2)  # the equal block before the merged one is checked again: its right side grew
            continue
        k += 1
    return ops  # type: ignore[return-value]


def align_tokens(original_ids: Sequence[int], edited_ids: Sequence[int]) -> TokenAlignment:
    """Diff two token id lists and mark the changed tokens (U1) of each side.

    >>> a = align_tokens([5, 6, 7, 0], [5, 9, 7, 0])          # substitution 6 -> 9
    >>> a.changed_original, a.changed_edited
    ([False, True, False, False], [False, True, False, False])
    >>> align_tokens([5, 7, 0], [5, 6, 7, 0]).changed_original  # insertion: token after it (7)
    [False, True, False]
    """
    a, b = list(original_ids), list(edited_ids)
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    opcodes = absorb_coincidences(later_copies(matcher.get_opcodes(), a, b))
    changed_a, changed_b = [False] * len(a), [False] * len(b)
    for tag, i1, i2, j1, j2 in opcodes:
        if tag == "equal":
            continue
        _mark(changed_a, i1, i2)
        _mark(changed_b, j1, j2)
    return TokenAlignment(changed_a, changed_b, opcodes)  # type: ignore[arg-type]


def spans_to_token_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[Sequence[int]] | None) -> list[bool]:
    """True for each token whose character range [start, end) overlaps a span [a, b).

    Zero-width tokens (e.g. the closing EOS at (len, len)) and empty spans never match.

    >>> spans_to_token_mask([(0, 3), (3, 7), (8, 10), (10, 10)], [(4, 5)])
    [False, True, False, False]
    """
    spans = [(int(s[0]), int(s[1])) for s in (spans or []) if int(s[1]) > int(s[0])]
    return [e > s and any(s < hi and lo < e for lo, hi in spans) for s, e in offsets]
