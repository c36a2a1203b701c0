"""Checking what the page posts (drafts and answers) before anything is stored.

The browser is not trusted: the edit ratio is computed again here with
:func:`finegrain.edit.distance.edit_stats`, spans are checked against the original text
(character offsets in code points, as ``gold_spans`` are everywhere in finegrain), and every
field has a type and a size limit. A bad post gets HTTP 400 with a message the page shows.
"""
from __future__ import annotations

import math
import re
from typing import Any, Sequence

from ..data.loaders import check_text
from ..edit.distance import edit_stats
from ..errors import InputError
from .store import ANSWERS, Answer

MAX_TEXT = 200_000  # characters of an edit
MAX_NOTE = 2_000
MAX_SPANS = 200
FLAG_REASONS = ("unsafe", "unreadable", "other")
_SURROGATE = re.compile("[\ud800-\udfff]")


class AnswerError(ValueError):
    """A post the server refuses (HTTP 400); ``field`` names the part of the page at fault."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def same_text(a: str, b: str) -> bool:
    """Equal up to whitespace, the test ``finegrain edit`` applies before calling an edit 'unchanged'."""
    return " ".join(a.split()) == " ".join(b.split())


def line_ends_like(original: str, edited: str) -> str:
    """``edited`` with the original's line ends: a browser's text box turns every CRLF into LF."""
    if "\r\n" in original and original.count("\n") == original.count("\r\n"):
        return edited.replace("\r\n", "\n").replace("\n", "\r\n")
    return edited


def textarea_text(text: str) -> str:
    """``text`` as a browser's text box holds it: every CRLF and CR a LF (a person cannot have changed those)."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def parse_text(value: Any, field: str = "text", original: str | None = None) -> str:
    """A posted text: a string of at most MAX_TEXT characters, and, as an edit of ``original``, at most
    :func:`max_edit_length` (a minimal edit is about the original's length; the alignment of a much longer
    one costs seconds at every submit and every admin report)."""
    if not isinstance(value, str):
        raise AnswerError("the text must be a string", field)
    limit = MAX_TEXT if original is None else min(MAX_TEXT, max_edit_length(original))
    if len(value) > limit:
        raise AnswerError(f"the text is longer than {limit} characters"
                          + (" (3 times the original's length + 2000: an edit should be minimal)"
                             if limit < MAX_TEXT else ""), field)
    m = _SURROGATE.search(value)
    if m:  # JSON can carry one ("\ud800"), SQLite cannot store it: a 400, not a server error
        raise AnswerError(f"the text contains a lone surrogate U+{ord(m.group()):04X} at character {m.start()} "
                          "(not valid Unicode text)", field)
    return value


def max_edit_length(original: str) -> int:
    """The longest edit of ``original`` accepted: 3 times its length plus 2,000 characters."""
    return 3 * len(original) + 2000


def parse_spans(value: Any, original: str, error_types: Sequence[str]) -> list[list]:
    """``[[start, end, type], ...]``: code-point offsets into ``original``, start < end, a known type."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_SPANS:
        raise AnswerError(f"spans must be a list of at most {MAX_SPANS} [start, end, type]", "spans")
    out = []
    for s in value:
        if (not isinstance(s, list) or len(s) != 3 or not all(isinstance(x, int) and not isinstance(x, bool)
                                                               for x in s[:2]) or not isinstance(s[2], str)):
            raise AnswerError("each span must be [start, end, type]", "spans")
        start, end, kind = s
        if not 0 <= start < end <= len(original):
            raise AnswerError(f"span [{start}, {end}] is outside the original response ({len(original)} characters)",
                              "spans")
        if kind not in error_types:
            raise AnswerError(f"unknown error type {kind!r} (known: {', '.join(error_types)})", "spans")
        out.append([start, end, kind])
    return sorted(out)


def parse_seconds(value: Any, upper: float) -> float:
    """Active seconds reported by the page, clamped to [0, ``upper``] (the wall time of the task)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return 0.0
    return round(min(max(float(value), 0.0), max(upper, 0.0)), 3)


def parse_note(value: Any) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str) or len(value) > MAX_NOTE:
        raise AnswerError(f"the note must be text of at most {MAX_NOTE} characters", "note")
    try:
        return check_text(value, "note")
    except InputError as e:
        raise AnswerError(f"the note {e.message}", "note") from e


def build_answer(payload: dict, *, original: str, prefill: str | None, error_types: Sequence[str],
                 guidelines_version: str, wall_s: float) -> Answer:
    """The :class:`~finegrain.annotate.store.Answer` a posted answer stands for, or :class:`AnswerError`."""
    action = payload.get("action")
    if action not in ANSWERS:
        raise AnswerError(f"unknown action {action!r} (one of {', '.join(ANSWERS)})", "action")
    note = parse_note(payload.get("note"))
    active_s = parse_seconds(payload.get("active_s"), wall_s)
    edited, spans, ratio, stats, reason = None, [], None, None, None
    if action == "submit":
        edited = line_ends_like(original, parse_text(payload.get("text"), original=original))
        try:
            check_text(edited, "edited")
        except InputError as e:
            raise AnswerError(f"the edit {e.message}", "text") from e
        if same_text(edited, original):
            raise AnswerError("the edit changes nothing: choose 'Nothing to fix' (Alt+N) instead", "text")
        spans = parse_spans(payload.get("spans"), original, error_types)
        stats = edit_stats(original, edited)
        ratio = stats["edit_ratio"]
        if prefill is not None:
            stats["prefill_edit_ratio"] = edit_stats(prefill, edited)["edit_ratio"]
            stats["prefill_changed"] = textarea_text(edited) != textarea_text(prefill)  # not just its line ends
    elif action == "flag":
        reason = payload.get("flag_reason") or FLAG_REASONS[0]
        if reason not in FLAG_REASONS:
            raise AnswerError(f"unknown flag reason {reason!r} (one of {', '.join(FLAG_REASONS)})", "flag_reason")
    return Answer(action, edited, spans, note, reason, active_s, ratio, stats, guidelines_version)


__all__ = ["AnswerError", "FLAG_REASONS", "build_answer", "line_ends_like", "parse_seconds", "parse_spans",
           "parse_text", "same_text", "textarea_text"]
