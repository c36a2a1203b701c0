"""Guards that keep only real minimal edits; each rejection carries a reason for ``*.rejects.jsonl``.

Checked in this order, the first that fires is the reason:

- ``error`` codes from the backend (``missing``, ``truncated``, ``http_400``, ``failed`` ...);
- ``empty``: no text, or only whitespace;
- ``invalid_text``: characters the pair files refuse (control characters other than tab, newline
  and carriage return; lone surrogates), so that train-rm never stops at an accepted edit;
- ``refusal``: the answer opens like a refusal ("I'm sorry, but I can't ...") while the
  original did not, AND it either talks about the editing task (edit, revise, rewrite, this
  response/content/request) or is not a minimal edit. An apology the editor inserted into an
  otherwise kept response ("I can't give medical advice, but ...") is a legitimate safety edit
  and passes;
- ``unchanged``: the edit equals the original up to whitespace, unless ``allow_unchanged``
  (DESIGN.md: a pair whose edit changes nothing carries no signal);
- ``non_minimal``: edit ratio (:mod:`finegrain.edit.distance`) above ``max_edit_ratio``.

Default ``max_edit_ratio = 0.75``, measured on real human edits: 344 human corrections of
model answers in QA-Feedback (Wu et al. 2023; ``prediction 1`` vs ``corrected-prediction`` of
dev_feedback_350.json) have edit ratios p10 0.23, p25 0.35, p50 0.51, p75 0.64, p90 0.75,
p95 0.80, p99 0.88, while two unrelated answers of that set (answer i vs answer i+1) score
p1 0.82, p5 0.84, p50 0.90. 0.75 keeps the 90% least-edited human corrections and rejects
answers that share no more with the original than an unrelated answer does. Those human
corrections also delete irrelevant sentences and add missing facts, so they are heavier than
the paper's minimal edits: lower the threshold for stricter data.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..data.loaders import check_text
from ..errors import InputError
from .distance import edit_stats
from .postprocess import looks_like_refusal

DEFAULT_MAX_EDIT_RATIO = 0.75
_TASK_WORDS_RE = re.compile(
    r"\b(edit|edits|editing|revise|revision|rewrite|modify|this (?:response|content|text|request|task))\b",
    re.IGNORECASE)


@dataclass(frozen=True)
class GuardConfig:
    max_edit_ratio: float = DEFAULT_MAX_EDIT_RATIO
    allow_unchanged: bool = False


def _normalise_ws(text: str) -> str:
    return " ".join(text.split())


def check_edit(original: str, edited: str | None, error: str | None, cfg: GuardConfig
               ) -> tuple[str | None, dict[str, Any] | None]:
    """``(reason, stats)``: ``reason`` is None when the edit is accepted; ``stats`` from ``edit_stats``."""
    if error:
        code = error.split(":", 1)[0].strip()
        return (code if re.fullmatch(r"[a-z][a-z0-9_]{0,30}", code) else "error"), None
    if edited is None or not edited.strip():
        return "empty", None
    try:
        check_text(edited, "edited")
    except InputError:
        return "invalid_text", None
    stats = edit_stats(original, edited)
    too_big = stats["edit_ratio"] > cfg.max_edit_ratio
    if looks_like_refusal(edited) and not looks_like_refusal(original):
        if too_big or _TASK_WORDS_RE.search(edited[:400]):
            return "refusal", stats
    if _normalise_ws(edited) == _normalise_ws(original) and not cfg.allow_unchanged:
        return "unchanged", stats
    if too_big:
        return "non_minimal", stats
    return None, stats
