"""The two record types every stage exchanges (TRL's preference format, plus edits).

- ``PreferencePair``: ``prompt``, ``chosen`` (preferred), ``rejected``, ``id``.
- ``EditedPair``: the pair plus ``edited`` (a minimal edit of ``rejected``, preferred to it),
  ``edit_meta`` (who edited, how much changed) and optional ``gold_spans`` (character spans of
  ``rejected`` known to be flawed). ``chosen`` may be absent in an edited pair.

``comparisons(pairs, kind)`` turns either into (prompt, better, worse) triples for a reward
model: ``preference`` compares chosen > rejected, ``edit`` compares edited > rejected.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Literal, NamedTuple

PairKind = Literal["preference", "edit"]


@dataclass
class PreferencePair:
    prompt: str
    chosen: str | None
    rejected: str
    id: str
    meta: dict[str, Any] = field(default_factory=dict)  # other fields of the source record, kept as they were

    def to_json(self) -> dict[str, Any]:
        d = {"id": self.id, "prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}
        d.update({k: v for k, v in self.meta.items() if k not in d})
        return d


@dataclass
class EditedPair(PreferencePair):
    edited: str = ""
    edit_meta: dict[str, Any] = field(default_factory=dict)
    gold_spans: list[tuple[int, int]] | None = None  # [start, end) character spans of `rejected`

    def to_json(self) -> dict[str, Any]:
        d = super().to_json()
        d["edited"] = self.edited
        d["edit_meta"] = self.edit_meta
        if self.gold_spans is not None:
            d["gold_spans"] = [list(s) for s in self.gold_spans]
        return d


class Comparison(NamedTuple):
    id: str
    prompt: str
    better: str
    worse: str
    gold_spans: list[tuple[int, int]] | None  # flawed character spans of `worse`, when known


def comparisons(pairs: Iterable[PreferencePair], kind: PairKind) -> list[Comparison]:
    out = []
    for p in pairs:
        if kind == "edit":
            if not isinstance(p, EditedPair):
                raise TypeError("edit comparisons need EditedPair records (load them with kind='edit')")
            out.append(Comparison(p.id, p.prompt, p.edited, p.rejected, p.gold_spans))
        else:
            if p.chosen is None:
                raise ValueError(f"pair {p.id!r} has no 'chosen' response")
            spans = p.gold_spans if isinstance(p, EditedPair) else p.meta.get("gold_spans")
            out.append(Comparison(p.id, p.prompt, p.chosen, p.rejected,
                                  None if spans is None else [(int(s[0]), int(s[1])) for s in spans]))
    return out


__all__ = ["PairKind", "PreferencePair", "EditedPair", "Comparison", "comparisons", "asdict"]
