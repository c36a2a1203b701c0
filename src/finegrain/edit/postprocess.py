"""Turning an LLM's raw answer into the edited response or a preference.

``clean_answer`` removes what LLMs wrap around an edit even when told not to: a preamble
("Here is the edited response:", "Sure! Here's the revised version:", "Edited response:"),
a code fence around the whole answer, quotation marks around the whole answer and the
``<response>`` tags of our own prompt. Each is removed only when the ORIGINAL response did not
have it too (a response that itself starts with "Here is a list:" keeps it).

``looks_like_refusal`` spots an opener such as "I'm sorry, but I can't"; the guard in
:mod:`finegrain.edit.guards` decides whether it is a refusal of the task.

``parse_preference`` reads a judge's one-word answer (A, B or TIE) as AlpacaEval's preference.
"""
from __future__ import annotations

import re

_PREAMBLE_RE = re.compile(
    r"""^\s*(?:(?:sure|certainly|of\s+course|okay|ok|absolutely)[\s,!.:-]*)?
    (?:
        (?:here(?:\s+is|\s+are|'s|’s)|below\s+is|this\s+is)\s+[^\n:]{0,80}?
            (?:edit|edited|revised|revision|corrected|improved|updated|modified|fixed|rewritten|version|response|answer)
            [^\n:]{0,40}:
      | (?:the\s+)?(?:minimally\s+)?(?:edited|revised|corrected|improved|updated|modified|fixed)\s+
            (?:response|answer|version|text)\s*:
    )[ \t]*\n?""",
    re.IGNORECASE | re.VERBOSE,
)
_FENCE_RE = re.compile(r"^```[\w+-]*[ \t]*\n(.*?)\n?```$", re.DOTALL)
_TAG_RE = re.compile(r"^<(response|edited_response|output)>\s*\n?(.*?)\n?\s*</\1>$", re.DOTALL)
_QUOTES = [('"', '"'), ("“", "”"), ("'", "'"), ("«", "»")]
_REFUSAL_RE = re.compile(
    r"^\W*(?:i(?:'m| am|’m)\s+(?:sorry|afraid|unable|not able)|i\s+apologi[sz]e|sorry\b|my\s+apologies"
    r"|i\s+(?:can(?:no|'|’)t|cannot|won(?:'|’)t|will\s+not|must\s+decline|do\s+not\s+feel\s+comfortable)"
    r"|as\s+an\s+ai\b|unfortunately,?\s+i\s+(?:can(?:no|'|’)t|cannot))",
    re.IGNORECASE,
)


def _strip_once(text: str, original: str) -> str:
    m = _PREAMBLE_RE.match(text)
    if m and m.end() < len(text) and not _PREAMBLE_RE.match(original):
        return text[m.end():].strip()
    m = _FENCE_RE.match(text)
    if m and not _FENCE_RE.match(original.strip()):
        return m.group(1).strip("\n")
    m = _TAG_RE.match(text)
    if m:
        return m.group(2).strip("\n")
    for left, right in _QUOTES:
        if (len(text) >= 2 and text.startswith(left) and text.endswith(right) and left not in text[1:-1]
                and not (original.strip().startswith(left) and original.strip().endswith(right))):
            return text[1:-1].strip()
    return text


def clean_answer(answer: str, original: str) -> str:
    """The edited response inside ``answer`` (see module docstring); ``original`` is the response edited."""
    text = answer.strip()
    for _ in range(4):  # a preamble, then a fence, then quotes inside it ...
        new = _strip_once(text, original)
        if new == text:
            break
        text = new
    return text


def looks_like_refusal(text: str) -> bool:
    """True when ``text`` opens like a refusal or an apology."""
    return bool(_REFUSAL_RE.match(text[:300]))


_PREF_WORDS = {"a": 1.0, "b": 2.0, "tie": 1.5, "equal": 1.5, "draw": 1.5}
_PREF_RE = re.compile(r"^\W*(?:output\s*|answer\s*|response\s*)?\(?\s*(a|b|tie|equal|draw)\s*\)?(?:\W|$)", re.IGNORECASE)


def parse_preference(answer: str) -> float | None:
    """1.0 (output A), 2.0 (output B), 1.5 (tie) from a judge's answer, or None if it names none.

    >>> [parse_preference(x) for x in ["A", "**B**", "Output (a)", "TIE.", "tie", "Both are good"]]
    [1.0, 2.0, 1.0, 1.5, 1.5, None]
    """
    first = answer.strip().splitlines()[0] if answer.strip() else ""
    m = _PREF_RE.match(first.replace("*", "").strip())
    return _PREF_WORDS[m.group(1).lower()] if m else None
