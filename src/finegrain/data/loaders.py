"""Loading and validating preference pairs and edited pairs from any supported source.

A source is anything :func:`finegrain.io.iter_records` reads (.jsonl, .jsonl.gz, .json,
.parquet or a `datasets` name). Each record is checked field by field; a bad record raises ONE
:class:`~finegrain.errors.InputError` naming the file, the record (``line 3`` / ``index 3``) and
the field, or, with ``skip_invalid=True``, is written to a rejects file and counted.

Record format (TRL's preference format, plus edits):

- preference: ``prompt``, ``chosen``, ``rejected`` (non-empty strings), optional ``id``;
- edit: the same plus ``edited`` (non-empty string), optional ``edit_meta`` (object), optional
  ``gold_spans`` (list of ``[start, end)`` character spans of ``rejected``); ``chosen`` may be
  absent or null. A preference pair may carry ``gold_spans`` too (checked the same way, kept in
  ``meta``): eval-rm scores a token RM's localisation against them.

Decisions:

- ``id`` absent: a stable content id, ``"h" + sha1(prompt, chosen, rejected[, edited])[:16]``,
  so that it survives reordering and subsetting of the file; two records with the same content
  and no id are then reported as duplicates (they would count twice).
- ``gold_spans`` that overlap are merged into their union (they mark the same flawed
  characters, e.g. two error types on one phrase), and sorted.
- ``chosen == rejected`` (preference) is an error: the pair says nothing.
- ``edited == rejected`` (edit) is not an error: the pair carries no signal, so it is dropped and
  counted (``n_unchanged``), as DESIGN.md decides for edits that change nothing.
- Text may not hold control characters other than tab, newline and carriage return (a NUL
  byte usually means a binary or mis-encoded file), nor lone surrogates. Long text is fine.
- Any other field is kept in ``meta`` and written back as it was.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, NamedTuple

from ..errors import ConfigError, InputError
from ..io import iter_records, write_jsonl
from ..spans import check_spans
from .schema import EditedPair, PairKind, PreferencePair

KINDS = ("preference", "edit")
PAIR_FIELDS = ("id", "prompt", "chosen", "rejected")
EDIT_FIELDS = PAIR_FIELDS + ("edited", "edit_meta", "gold_spans")
# C0/C1 controls and lone surrogates; tab, newline and carriage return are ordinary text
_BAD_CHAR = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


@dataclass
class LoadReport:
    """What :func:`load_pairs_report` read: the valid pairs and counts of everything else."""

    pairs: list[PreferencePair]
    path: str
    kind: str
    n_records: int = 0  # records read from the source, valid or not
    n_rejected: int = 0  # invalid records (raised, or written to ``rejects_path``)
    n_unchanged: int = 0  # edit pairs with edited == rejected, dropped (no signal)
    n_spans_merged: int = 0  # overlapping gold spans merged into one
    rejects_path: str | None = None
    errors: Counter = field(default_factory=Counter)  # field -> number of rejects for it

    def summary(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "n_records": self.n_records, "n_pairs": len(self.pairs),
                "n_rejected": self.n_rejected, "n_unchanged_dropped": self.n_unchanged,
                "n_spans_merged": self.n_spans_merged, "rejects_path": self.rejects_path,
                "rejected_by_field": dict(self.errors)}


# ---------------------------------------------------------------- field checks (pure functions)

def check_text(value: Any, name: str, *, optional: bool = False) -> str | None:
    """``value`` if it is usable text, else raise ``InputError(field=name)`` saying what is wrong."""
    if value is None and optional:
        return None
    if not isinstance(value, str):
        got = "null" if value is None else type(value).__name__
        raise InputError(f"must be a string, got {got}", field=name)
    if not value.strip():
        raise InputError("must be a non-empty string (got only whitespace)" if value else
                         "must be a non-empty string", field=name)
    m = _BAD_CHAR.search(value)
    if m:
        ch = m.group()
        what = "a lone surrogate (not valid Unicode text)" if "\ud800" <= ch <= "\udfff" else \
            f"a control character ({unicodedata.name(ch, 'control')})"
        raise InputError(f"contains {what} U+{ord(ch):04X} at character {m.start()}", field=name)
    return value


def check_id(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        got = "null" if value is None else type(value).__name__
        raise InputError(f"must be a string (or an integer), got {got}", field="id")
    value = str(value)
    if not value.strip():
        raise InputError("must be a non-empty string", field="id")
    return value


def content_id(*texts: str | None) -> str:
    """Stable id of a pair without one: ``h`` + 16 hex digits of sha1 over its texts."""
    digest = hashlib.sha1(json.dumps(texts, ensure_ascii=False).encode("utf-8", "surrogatepass")).hexdigest()
    return "h" + digest[:16]


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ConfigError(f"unknown pair kind {kind!r}: use one of {', '.join(KINDS)}")
    return kind


def pair_from_record(rec: dict, kind: PairKind) -> tuple[PreferencePair, int]:
    """Validate one record and build its pair; returns ``(pair, n_spans_merged)``.

    Raises :class:`InputError` with ``field`` set (the caller adds path and record).
    An edit pair with ``edited == rejected`` is returned as is; the caller drops it.
    """
    check_kind(kind)
    if not isinstance(rec, dict):
        raise InputError(f"expected a JSON object, got {type(rec).__name__}")
    required = ("prompt", "rejected", "edited") if kind == "edit" else ("prompt", "chosen", "rejected")
    for name in required:
        if name not in rec:
            hint = " (edit pairs need 'edited': run `finegrain edit` first)" if name == "edited" else ""
            raise InputError(f"missing (found fields: {', '.join(map(str, rec)) or 'none'}){hint}", field=name)
    prompt = check_text(rec["prompt"], "prompt")
    rejected = check_text(rec["rejected"], "rejected")
    chosen = check_text(rec.get("chosen"), "chosen", optional=kind == "edit")
    pid = check_id(rec["id"]) if "id" in rec else None
    known = EDIT_FIELDS if kind == "edit" else PAIR_FIELDS
    meta = {k: v for k, v in rec.items() if k not in known}
    if kind == "preference":
        if chosen == rejected:
            raise InputError("is identical to 'rejected': the pair says nothing", field="chosen")
        spans, merged = check_spans(rec.get("gold_spans"), len(rejected))
        if spans is not None:  # flawed spans of `rejected` on a preference pair: kept in meta, checked like an edit's
            meta["gold_spans"] = [list(s) for s in spans]
        return PreferencePair(prompt, chosen, rejected, pid or content_id(prompt, chosen, rejected), meta), merged
    edited = check_text(rec["edited"], "edited")
    edit_meta = rec.get("edit_meta")
    if edit_meta is None:
        edit_meta = {}
    elif not isinstance(edit_meta, dict):
        raise InputError(f"must be an object, got {type(edit_meta).__name__}", field="edit_meta")
    spans, merged = check_spans(rec.get("gold_spans"), len(rejected))
    pid = pid or content_id(prompt, chosen, rejected, edited)
    return EditedPair(prompt, chosen, rejected, pid, meta, edited=edited, edit_meta=edit_meta,
                      gold_spans=spans), merged


# ---------------------------------------------------------------- loading a whole source

class Rejects:
    """Collects rejected records; ``skip=False`` turns the first one into the raised error."""

    def __init__(self, skip: bool, report: LoadReport):
        self.skip, self.report, self.rows = skip, report, []
        self.first: InputError | None = None

    def __call__(self, err: InputError, raw: Any, location: str | None = None) -> None:
        if not self.skip:
            raise err
        self.first = self.first or err
        self.report.n_rejected += 1
        self.report.errors[err.field or "(record)"] += 1
        self.rows.append({"path": str(err.path), "location": err.record or location, "field": err.field,
                          "error": str(err), "record": _writable(raw)})


def _writable(raw: Any) -> Any:
    """``raw`` as plain JSON values, with surrogates (undecodable bytes, lone halves) shown as U+FFFD."""
    text = json.dumps(raw, ensure_ascii=False, default=str)
    return json.loads(re.sub("[\ud800-\udfff]", "\ufffd", text))


def located(err: InputError, path: str, location: str) -> InputError:
    """``err`` with the file and record filled in (keeps an already known location)."""
    if err.path is not None and err.record is not None:
        return err
    new = InputError(err.message, path=err.path or path, record=err.record or location, field=err.field)
    new.__cause__ = err.__cause__
    return new


class Candidate(NamedTuple):
    """A pair record to validate, with where it came from."""

    location: str  # "line 3" / "index 3" in the source file
    record: dict  # the pair record (prompt, chosen, rejected, ...)
    kind: PairKind
    source_fields: dict[str, str] = {}  # pair field -> its name in the source, for error messages
    source: Any = None  # the source record, written to the rejects file (default: ``record``)


def iter_checked(path: str, items: Iterable[Candidate], report: LoadReport, reject: Rejects
                 ) -> Iterator[PreferencePair]:
    """Validate candidates; yield good pairs, route bad ones to ``reject``, drop unchanged edits.

    ``source_fields`` lets a converter's error name the source's field (e.g.
    ``feedback['corrected-prediction']`` rather than ``edited``). Ids must be unique.
    """
    seen: dict[str, str] = {}
    for location, rec, kind, names, source in items:
        try:
            pair, merged = pair_from_record(rec, kind)
            if pair.id in seen:
                what = "id" if "id" in rec else "content (no 'id'; the same pair would count twice)"
                raise InputError(f"duplicate {what}: {pair.id!r} was already used at {seen[pair.id]}", field="id")
        except InputError as e:
            err = located(e, path, location)
            if err.field in names:
                err = InputError(err.message, path=err.path, record=err.record, field=names[err.field])
            reject(err, rec if source is None else source, location)
            continue
        seen[pair.id] = location
        report.n_spans_merged += merged
        if isinstance(pair, EditedPair) and pair.edited == pair.rejected:
            report.n_unchanged += 1
            continue
        yield pair


def load_pairs_report(path: str | os.PathLike, kind: PairKind = "preference", *, skip_invalid: bool = False,
                      rejects_path: str | os.PathLike | None = None) -> LoadReport:
    """Read and validate every record of ``path`` as ``kind`` pairs; see the module docstring.

    With ``skip_invalid=False`` the first bad record raises :class:`InputError`. With
    ``skip_invalid=True`` bad records are counted and written to ``rejects_path`` (default:
    ``<path>.rejects.jsonl`` beside a local file) as JSON lines ``{path, location, field, error,
    record}``. An empty source is an error either way.
    """
    check_kind(kind)
    path = str(path)
    report = LoadReport([], path, kind)
    reject = Rejects(skip_invalid, report)

    def unreadable(err: InputError, raw: Any) -> None:
        report.n_records += 1
        reject(err, raw)

    def items() -> Iterator[Candidate]:
        for location, rec in iter_records(path, on_error=unreadable):
            report.n_records += 1
            yield Candidate(location, rec, kind)

    report.pairs = list(iter_checked(path, items(), report, reject))
    finish_report(report, reject, rejects_path, default_rejects=_default_rejects_path(path))
    return report


def _default_rejects_path(path: str) -> str | None:
    if not os.path.exists(path):
        return None  # a `datasets` name: no natural place beside it
    base = re.sub(r"(\.jsonl|\.json|\.parquet)?(\.gz)?$", "", path)
    return base + ".rejects.jsonl"


def finish_report(report: LoadReport, reject: Rejects, rejects_path: Any, default_rejects: str | None) -> None:
    """Write the rejects file (if any), then refuse a source with no records or with only bad ones.

    No valid pair at all almost always means the wrong format (``--from``) or kind, not bad luck.
    """
    if report.n_records == 0 and report.n_rejected == 0:
        raise InputError("no records (the file is empty)", path=report.path)
    _write_rejects(report, reject, rejects_path, default_rejects)
    if reject.first is not None and not report.pairs and not report.n_unchanged:
        e = reject.first
        where = ": ".join([str(e.record)] * (e.record is not None) + [f"field {e.field!r}"] * (e.field is not None))
        raise InputError(f"no valid pair in {report.n_records} records (wrong format?); the first error: "
                         f"{where + ': ' if where else ''}{e.message}"
                         + (f" (all in {report.rejects_path})" if report.rejects_path else ""), path=report.path)


def _write_rejects(report: LoadReport, reject: Rejects, rejects_path: Any, default_rejects: str | None) -> None:
    if reject.rows:
        target = rejects_path or default_rejects
        if target is None:
            return
        try:
            write_jsonl(target, reject.rows)
        except OSError as e:
            if rejects_path is not None:
                raise InputError(f"cannot write the rejects file: {e.strerror or e}", path=target) from e
            logging.getLogger(__name__).warning("%s: cannot write the rejects file (%s); pass rejects_path to "
                                                "keep the %d rejected records", target, e, len(reject.rows))
            return
        report.rejects_path = str(target)


def load_pairs(path: str | os.PathLike, kind: PairKind = "preference", *, skip_invalid: bool = False,
               rejects_path: str | os.PathLike | None = None) -> list[PreferencePair]:
    """The valid pairs of ``path`` (``PreferencePair`` or, for ``kind="edit"``, ``EditedPair``).

    Use :func:`load_pairs_report` to also get the counts of rejected and dropped records.
    """
    return load_pairs_report(path, kind, skip_invalid=skip_invalid, rejects_path=rejects_path).pairs


def save_pairs(path: str | os.PathLike, pairs: Iterable[PreferencePair]) -> int:
    """Write pairs as JSONL (atomically); :func:`load_pairs` reads them back unchanged."""
    return write_jsonl(path, (p.to_json() for p in pairs))


__all__ = ["KINDS", "Candidate", "LoadReport", "check_id", "check_text", "content_id", "load_pairs",
           "load_pairs_report", "located", "pair_from_record", "save_pairs"]
