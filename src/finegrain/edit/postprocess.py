"""Whether an edit opens like a refusal (used by the guards of :mod:`finegrain.edit.guards`).

``looks_like_refusal`` spots an opener such as "I'm sorry, but I can't"; the guard decides
whether it is a refusal of the task. Reading the edit out of an LLM's answer is
:func:`finegrain.llm.chat.clean_answer`.
"""
from __future__ import annotations

import re

_REFUSAL_RE = re.compile(
    r"^\W*(?:i(?:'m| am|’m)\s+(?:sorry|afraid|unable|not able)|i\s+apologi[sz]e|sorry\b|my\s+apologies"
    r"|i\s+(?:can(?:no|'|’)t|cannot|won(?:'|’)t|will\s+not|must\s+decline|do\s+not\s+feel\s+comfortable)"
    r"|as\s+an\s+ai\b|unfortunately,?\s+i\s+(?:can(?:no|'|’)t|cannot))",
    re.IGNORECASE,
)


def looks_like_refusal(text: str) -> bool:
    """True when ``text`` opens like a refusal or an apology."""
    return bool(_REFUSAL_RE.match(text[:300]))
