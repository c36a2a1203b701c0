"""Edits and judgements made by people, imported from files (backend ``file``; module ``finegrain.llm.files``).

Human edits: JSONL (or .json / .jsonl.gz / .parquet), one object per edited pair::

    {"id": "pair-17", "edited": "The minimally edited response ...", "annotator": "ann-3", "notes": "fixed the date"}

``id`` (the pair's id in the ``--data`` file) and ``edited`` (the whole edited response, not a
diff) are required; ``annotator`` and ``notes`` are optional and copied into ``edit_meta``.
Optional too (``finegrain annotate export`` writes them): ``gold_spans`` (``[[start, end], ...]``,
character spans of the pair's ``rejected`` that the person marked as flawed; they become the
edited pair's ``gold_spans``) and ``edit_meta`` (an object copied into the edited pair's
``edit_meta``, except the keys ``finegrain edit`` sets itself: backend, model, edit stats, times).
Run ``finegrain edit --backend file --model human_edits.jsonl --data pairs.jsonl ...``: the
same guards as for LLM edits apply, pairs without an edit are rejected with reason ``missing``.
An empty file, or an edit whose id matches no pair of the data (a typo would silently lose
that person's work), is an error naming the file and the line (with ``--skip-invalid``: a
warning, and the count ``n_unmatched_human_edits`` in the summary).

Human judgements: AlpacaEval's annotations format (what ``finegrain winrate`` writes), a list
or JSONL of ``{"instruction", "output_1", "output_2", "preference"}`` with preference 1
(output_1 better), 2 (output_2 better) or 1.5 (tie), and optionally ``id``. A judgement is
found by ``id`` when both sides have one, else by instruction; its orientation is read from
the texts, so a judgement made with the outputs in the other order is flipped (3 - preference).
An empty judgements file is an error naming it.
"""
from __future__ import annotations

import logging
import math
import sys
from typing import Any

from ..errors import InputError
from ..io import iter_records
from ..spans import check_spans
from .interfaces import EditRequest, EditResult, JudgeRequest, JudgeResult


def _text(rec: dict, field: str, path: str, where: str, *, optional: bool = False) -> str | None:
    v = rec.get(field)
    if v is None and optional:
        return None
    # an edit may delete everything, and a model's output may be empty (AlpacaEval's references hold two)
    if not isinstance(v, str) or (not optional and not v.strip() and field not in ("edited", "output_1", "output_2")):
        raise InputError("must be a non-empty string", path=path, record=where, field=field)
    return v


# edit_meta keys that `finegrain edit` sets itself; a human-edits file cannot override them
RESERVED_META = ("backend", "model", "prompt_version", "requested_at", "answered_at", "cached", "input_tokens",
                 "output_tokens", "original_tokens", "edited_tokens", "tokens_deleted", "tokens_inserted",
                 "changed_tokens", "changed_blocks", "edit_ratio")


def _gold_spans(rec: dict, path: str, where: str) -> list[list[int]] | None:
    """Validated ``gold_spans`` (shape and order; the bounds are checked against the pair's text later)."""
    try:
        spans, _ = check_spans(rec.get("gold_spans"), sys.maxsize)
    except InputError as e:
        raise InputError(e.message, path=path, record=where, field="gold_spans") from e
    return None if spans is None else [list(s) for s in spans]


def _edit_meta(rec: dict, path: str, where: str) -> dict[str, Any]:
    meta = rec.get("edit_meta")
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise InputError(f"must be an object, got {type(meta).__name__}", path=path, record=where, field="edit_meta")
    return {k: v for k, v in meta.items() if k not in RESERVED_META}


def load_human_edits(path: str) -> dict[str, dict[str, Any]]:
    """``{id: {"edited", "annotator", "notes", "gold_spans", "edit_meta", "where"}}`` from a human-edits
    file, validated (``where``: its line)."""
    out: dict[str, dict[str, Any]] = {}
    for where, rec in iter_records(path):
        raw_id = rec.get("id")
        if not isinstance(raw_id, (str, int)) or isinstance(raw_id, bool) or str(raw_id) == "":
            raise InputError("must be a non-empty string or an integer", path=path, record=where, field="id")
        pid = str(raw_id)
        if pid in out:
            raise InputError(f"duplicate id {pid!r} (one edit per pair)", path=path, record=where, field="id")
        edited = _text(rec, "edited", path, where)
        out[pid] = {"edited": edited, "annotator": _text(rec, "annotator", path, where, optional=True),
                    "notes": _text(rec, "notes", path, where, optional=True),
                    "gold_spans": _gold_spans(rec, path, where), "edit_meta": _edit_meta(rec, path, where),
                    "where": where}
    if not out:
        raise InputError("no human edits (the file is empty)", path=path)
    return out


class _FileBackend:
    """What the runner needs to know of a file backend: local, nothing to cache, no prompt."""

    name = "file"
    prompt_version = "human"
    cacheable = False
    remote = False


class FileEditor(_FileBackend):
    """Serves human edits by pair id; ``item_meta`` adds annotator, notes and the file's ``edit_meta`` to
    ``edit_meta``, ``item_gold_spans`` gives the marked spans."""

    def __init__(self, path: str):
        self.model = str(path)
        self.edits = load_human_edits(self.model)
        self.used: set[str] = set()

    async def edit(self, req: EditRequest) -> EditResult:
        rec = self.edits.get(req.id)
        if rec is None:
            return EditResult(None, error=f"missing: no human edit with id {req.id!r} in {self.model}")
        n_chars = len(req.response)
        for start, end in rec["gold_spans"] or []:
            if end > n_chars:
                raise InputError(f"span [{start}, {end}] is outside the rejected response of pair {req.id!r} "
                                 f"({n_chars} characters): were these edits made on another pairs file?",
                                 path=self.model, record=rec["where"], field="gold_spans")
        self.used.add(req.id)
        return EditResult(rec["edited"])

    def item_meta(self, item_id: str) -> dict[str, Any]:
        rec = self.edits.get(item_id) or {}
        meta = dict(rec.get("edit_meta") or {})
        meta.update({k: rec[k] for k in ("annotator", "notes") if rec.get(k) is not None})
        return meta

    def item_gold_spans(self, item_id: str) -> list[list[int]] | None:
        return (self.edits.get(item_id) or {}).get("gold_spans")

    def unused_ids(self) -> list[str]:
        return sorted(set(self.edits) - self.used)

    def check_ids(self, pair_ids: set[str], data: str, *, skip_invalid: bool = False) -> None:
        """Refuse an edit whose id matches no pair of ``data`` (with ``skip_invalid``: log a warning)."""
        unmatched = [pid for pid in self.edits if pid not in pair_ids]
        if not unmatched:
            return
        first = self.edits[unmatched[0]]["where"]
        if not skip_invalid:
            raise InputError(f"no pair with id {unmatched[0]!r} in {data} ({len(unmatched)} edit(s) match no pair); "
                             "fix the id, or pass --skip-invalid to leave such edits out",
                             path=self.model, record=first, field="id")
        logging.getLogger("finegrain.llm").warning("%s: %d human edit(s) match no pair of %s (the first: %r at %s); "
                                                    "left out", self.model, len(unmatched), data, unmatched[0], first)


def _preference(rec: dict, path: str, where: str) -> float:
    v = rec.get("preference")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and math.isnan(v)) \
            or float(v) not in (1.0, 1.5, 2.0):
        raise InputError(f"must be 1, 2 or 1.5 (tie), got {v!r}", path=path, record=where, field="preference")
    return float(v)


class FileJudge(_FileBackend):
    """Serves judgements from an AlpacaEval-format annotations file (see module docstring)."""

    def __init__(self, path: str):
        self.model = str(path)
        self.by_id: dict[str, dict] = {}
        self.by_instruction: dict[str, dict] = {}
        for where, rec in iter_records(self.model):
            if "preference" in rec and rec["preference"] is None:  # a judgement that failed (winrate writes those)
                continue
            item = {"instruction": _text(rec, "instruction", self.model, where),
                    "output_1": _text(rec, "output_1", self.model, where),
                    "output_2": _text(rec, "output_2", self.model, where),
                    "preference": _preference(rec, self.model, where)}
            if rec.get("id") is not None:
                self.by_id.setdefault(str(rec["id"]), item)
            self.by_instruction.setdefault(item["instruction"], item)
        if not self.by_instruction:
            raise InputError("no judgements (the file is empty)", path=self.model)

    async def judge(self, req: JudgeRequest) -> JudgeResult:
        rec = self.by_id.get(req.id) or self.by_instruction.get(req.instruction)
        if rec is None:
            return JudgeResult(float("nan"), error=f"missing: no judgement for id {req.id!r} in {self.model}")
        if (req.output_1, req.output_2) == (rec["output_1"], rec["output_2"]):
            return JudgeResult(rec["preference"])
        if (req.output_1, req.output_2) == (rec["output_2"], rec["output_1"]):
            return JudgeResult(3.0 - rec["preference"])
        return JudgeResult(float("nan"), error=f"mismatch: the judgement for {req.id!r} is about other outputs")
