"""Reading what ``finegrain annotate serve`` is given: pairs, pre-edits, screening items, guidelines.

Every bad record stops the start with one :class:`~finegrain.errors.InputError` naming the file,
the record and the field, as in the other verbs.

- Pairs (``--data``): preference pairs, read by :func:`finegrain.data.load_pairs_report`.
- Pre-edits (``--prefill``): edited pairs, the output of ``finegrain edit``; each is matched to a
  pair by ``id`` and must have been made from the same ``rejected`` response. Pre-edits of pairs
  that are not in ``--data`` are counted and ignored.
- Screening items (``--screening``): pairs (``prompt``, ``rejected``, optional ``chosen`` and
  ``id``) with a known answer: ``"expected": "nothing_to_fix"`` (the response is fine), or an
  expected minimal edit ``edited`` and/or the known flawed ``gold_spans`` of ``rejected``.
- Guidelines (``--guidelines``): a packaged version (``minimal_edit_v1``) or a text file.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..data.loaders import check_id, check_text, content_id, located, pair_from_record
from ..data.schema import PreferencePair
from ..errors import ConfigError, InputError
from ..io import iter_records
from ..spans import check_spans


@dataclass
class Item:
    """One thing to annotate: a pair of ``--data`` or a screening item."""

    pair_id: str
    prompt: str
    chosen: str | None
    rejected: str
    kind: str = "pair"  # "pair" | "screening"
    prefill: str | None = None  # an LLM's edit of ``rejected`` to start from
    prefill_meta: dict[str, Any] | None = None  # who made it (backend, model, prompt version)
    expected: dict[str, Any] | None = None  # screening: the known answer
    location: str = ""  # where it came from, for error messages


@dataclass
class Guidelines:
    version: str
    text: str


@dataclass
class PrefillReport:
    n_records: int = 0
    n_matched: int = 0
    unmatched_ids: list[str] = field(default_factory=list)


def items_from_pairs(pairs: list[PreferencePair]) -> list[Item]:
    return [Item(p.id, p.prompt, p.chosen, p.rejected) for p in pairs]


def attach_prefill(items: list[Item], path: str) -> PrefillReport:
    """Set ``item.prefill`` from the edited pairs of ``path`` (see module docstring)."""
    by_id = {it.pair_id: it for it in items}
    report, seen = PrefillReport(), {}
    for where, rec in iter_records(path):
        report.n_records += 1
        try:
            pair, _ = pair_from_record(rec, "edit")
        except InputError as e:
            raise located(e, path, where) from e
        if pair.id in seen:
            raise InputError(f"duplicate id {pair.id!r} (already at {seen[pair.id]}): one pre-edit per pair",
                             path=path, record=where, field="id")
        seen[pair.id] = where
        item = by_id.get(pair.id)
        if item is None:
            report.unmatched_ids.append(pair.id)
            continue
        if pair.rejected != item.rejected:
            raise InputError(f"differs from the 'rejected' of pair {pair.id!r} in the pairs file: this pre-edit was "
                             "made from another response (run `finegrain edit` on this pairs file)",
                             path=path, record=where, field="rejected")
        meta = pair.edit_meta or {}
        item.prefill = pair.edited
        item.prefill_meta = {k: meta[k] for k in ("backend", "model", "prompt_version") if k in meta}
        report.n_matched += 1
    if report.n_records == 0:
        raise InputError("no records (the file is empty)", path=path)
    if report.n_matched == 0:
        raise InputError(f"no pre-edit matches a pair of the pairs file by id (first id: {report.unmatched_ids[0]!r})",
                         path=path)
    return report


def _expected(rec: dict, rejected: str) -> dict[str, Any]:
    """The known answer of a screening record."""
    expected = rec.get("expected")
    edited = check_text(rec.get("edited"), "edited", optional=True)
    spans, _ = check_spans(rec.get("gold_spans"), len(rejected))
    if expected is not None:
        if expected != "nothing_to_fix":
            raise InputError(f"must be \"nothing_to_fix\" (or absent, with 'edited' and/or 'gold_spans'), got "
                             f"{expected!r}", field="expected")
        if edited is not None or spans:
            raise InputError("\"nothing_to_fix\" cannot go with 'edited' or 'gold_spans'", field="expected")
        return {"nothing_to_fix": True}
    if edited is None and not spans:
        raise InputError("a screening item needs a known answer: \"expected\": \"nothing_to_fix\", or 'edited' "
                         "and/or 'gold_spans'", field="expected")
    if edited is not None and edited == rejected:
        raise InputError("is identical to 'rejected': use \"expected\": \"nothing_to_fix\"", field="edited")
    return {"nothing_to_fix": False, "edited": edited, "gold_spans": [list(s) for s in spans or []]}


def load_screening(path: str, taken_ids: set[str]) -> list[Item]:
    """Screening items of ``path``; their ids must differ from the pairs' ids (``taken_ids``)."""
    items: list[Item] = []
    seen: dict[str, str] = {}
    for where, rec in iter_records(path):
        try:
            prompt = check_text(rec.get("prompt"), "prompt")
            rejected = check_text(rec.get("rejected"), "rejected")
            chosen = check_text(rec.get("chosen"), "chosen", optional=True)
            pid = check_id(rec["id"]) if "id" in rec else content_id(prompt, chosen, rejected, "screening")
            if pid in taken_ids:
                raise InputError(f"{pid!r} is also the id of a pair to annotate: give screening items their own ids",
                                 field="id")
            if pid in seen:
                raise InputError(f"duplicate id {pid!r} (already at {seen[pid]})", field="id")
            expected = _expected(rec, rejected)
        except InputError as e:
            raise located(e, path, where) from e
        seen[pid] = where
        items.append(Item(pid, prompt, chosen, rejected, kind="screening", expected=expected, location=where))
    if not items:
        raise InputError("no records (the file is empty)", path=path)
    return items


def packaged_guidelines() -> list[str]:
    return sorted(p.name[:-4] for p in resources.files("finegrain.annotate").joinpath("guidelines").iterdir()
                  if p.name.endswith(".txt"))


def load_guidelines(name_or_path: str) -> Guidelines:
    """Packaged guidelines by version name, or a text file (version ``stem@sha256[:8]`` of its text)."""
    path = Path(name_or_path)
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"text is not valid UTF-8 (byte {e.start}); re-encode the file as UTF-8",
                             path=path) from e
        if not text.strip():
            raise InputError("the guidelines file is empty", path=path)
        return Guidelines(f"{path.stem}@{hashlib.sha256(text.encode()).hexdigest()[:8]}", text)
    res = resources.files("finegrain.annotate").joinpath("guidelines", f"{name_or_path}.txt")
    if not res.is_file():
        raise ConfigError(f"no guidelines {name_or_path!r}: give a packaged version "
                          f"({', '.join(packaged_guidelines())}) or the path of a text file")
    return Guidelines(name_or_path, res.read_text(encoding="utf-8"))


__all__ = ["Guidelines", "Item", "PrefillReport", "attach_prefill", "items_from_pairs", "load_guidelines",
           "load_screening", "packaged_guidelines"]
