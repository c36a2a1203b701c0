"""``finegrain annotate export``: the human-edits file that ``finegrain edit --backend file`` reads.

One JSON object per line, in queue order::

    {"id": "pair-17", "edited": "...", "annotator": "ann-3", "notes": "...", "gold_spans": [[4, 9]],
     "edit_meta": {"tool": "finegrain annotate", "time_spent_s": 41.2, "wall_time_s": 63.0,
                   "edit_ratio": 0.083333, "prefill_used": true, "prefill_model": "claude-...",
                   "prefill_edit_ratio": 0.04, "prefill_changed": true, "guidelines_version": "minimal_edit_v1",
                   "error_spans": [{"start": 4, "end": 9, "type": "inaccurate"}], ...}}

Only answers that are edits are written ("nothing to fix", skips and flags carry no edit; they
are counted in the summary), and screening items only with ``--include-screening``.

Several annotators of one pair (``--overlap`` > 1):

- ``--select consensus`` (default): one edit per pair, the one whose changed words agree best
  (mean Jaccard, :func:`~finegrain.annotate.agreement.consensus_index`) with the other
  annotators' edits of that pair; a tie (always the case with two edits) goes to the edit
  submitted first. ``edit_meta.n_edits_for_pair`` and ``edit_meta.agreement`` say how contested it was.
- ``--select all``: every edit, so a pair's id repeats. ``finegrain edit --backend file`` takes one
  edit per pair: use ``--select all --annotator NAME`` for one file per person.
"""
from __future__ import annotations

import itertools
from collections import Counter
from datetime import datetime, timezone
from typing import Any

from ..edit.distance import edit_stats
from ..errors import ConfigError
from ..io import write_jsonl
from .agreement import changed_words, consensus_index, word_agreement
from .config import ExportConfig
from .report import answered_tasks
from .store import Store


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds") if ts else None


def _agreement(t: dict, group: list[dict]) -> float | None:
    """Mean word agreement of edit ``t`` with the other edits of its pair."""
    mine = changed_words(t["rejected"], t["edited"])
    others = [word_agreement(mine, changed_words(o["rejected"], o["edited"])) for o in group if o is not t]
    return round(sum(others) / len(others), 6) if others else None


def edit_meta(t: dict, group: list[dict], select: str) -> dict[str, Any]:
    """What the export says about one edit (see module docstring)."""
    meta: dict[str, Any] = {"tool": "finegrain annotate", "annotator": t["name"], "time_spent_s": t["active_s"],
                            "wall_time_s": round(t["answered_at"] - t["assigned_at"], 3),
                            "edit_ratio": t["edit_ratio"], "prefill_used": t["prefill"] is not None,
                            "guidelines_version": t["guidelines_version"], "submitted_at": _iso(t["answered_at"]),
                            "revisions": t["revisions"], "n_edits_for_pair": len(group), "selection": select}
    if t["prefill"] is not None:
        stats = t["stats"] or {}
        pm = t["prefill_meta"]
        meta.update(prefill_backend=pm.get("backend"), prefill_model=pm.get("model"),
                    prefill_prompt_version=pm.get("prompt_version"),
                    prefill_ratio_to_original=edit_stats(t["rejected"], t["prefill"])["edit_ratio"],
                    prefill_edit_ratio=stats.get("prefill_edit_ratio"), prefill_changed=stats.get("prefill_changed"))
    if len(group) > 1:
        meta["agreement"] = _agreement(t, group)
    if t["spans"]:
        meta["error_spans"] = [{"start": s, "end": e, "type": k} for s, e, k in t["spans"]]
    if t["kind"] == "screening":
        meta["screening"] = True
    return meta


def export_row(t: dict, group: list[dict], select: str) -> dict[str, Any]:
    row: dict[str, Any] = {"id": t["pair_id"], "edited": t["edited"], "annotator": t["name"]}
    if t["note"]:
        row["notes"] = t["note"]
    if t["spans"]:
        row["gold_spans"] = [[s, e] for s, e, _ in t["spans"]]
    row["edit_meta"] = edit_meta(t, group, select)
    return row


def select_rows(tasks: list[dict], select: str) -> list[dict[str, Any]]:
    """Export rows of the answered ``tasks`` (edits only) by the ``select`` rule, in queue order."""
    # a tie goes to the edit submitted first: a later revision of it keeps its place
    edits = sorted((t for t in tasks if t["status"] == "submit"),
                   key=lambda t: (t["item_id"], t["first_answered_at"] or t["answered_at"]))
    rows = []
    for _, group in itertools.groupby(edits, key=lambda t: t["item_id"]):
        group = list(group)
        chosen = group if select == "all" else [group[consensus_index(group[0]["rejected"],
                                                                      [t["edited"] for t in group])]]
        rows.extend(export_row(t, group, select) for t in chosen)
    return rows


def export_annotations(cfg: ExportConfig) -> dict[str, Any]:
    """Write ``cfg.output`` from ``cfg.db``; return a summary (counts per action, rows, pairs)."""
    store = Store(cfg.db)
    with store.connect() as conn:
        tasks = answered_tasks(conn)
        names = {r[0] for r in conn.execute("SELECT name FROM annotators")}
    if cfg.annotator is not None and cfg.annotator not in names:
        raise ConfigError(f"no annotator {cfg.annotator!r} in {cfg.db} (known: {', '.join(sorted(names)) or 'none'})")
    kept = [t for t in tasks if (cfg.include_screening or t["kind"] == "pair")
            and (cfg.annotator is None or t["name"] == cfg.annotator)]
    rows = select_rows(kept, cfg.select)
    write_jsonl(cfg.output, rows)
    return {"output": cfg.output, "n_rows": len(rows), "n_pairs": len({r["id"] for r in rows}),
            "select": cfg.select, "annotator": cfg.annotator,
            "answers": dict(sorted(Counter(t["status"] for t in kept).items())),
            "n_screening_answers_left_out": sum(t["kind"] == "screening" for t in tasks) if not cfg.include_screening
            else 0,
            "next": f"finegrain edit --backend file --model {cfg.output} --data PAIRS --output edited.jsonl"}


__all__ = ["edit_meta", "export_annotations", "export_row", "select_rows"]
