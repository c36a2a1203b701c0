"""What the admin and progress pages show: counts, times, edit ratios, agreement, screening, a plot.

Times are the active seconds the page measured (the tab visible and the annotator active in the
last two minutes), never more than the wall time between getting the item and answering it.
"""
from __future__ import annotations

import io
import itertools
import json
import sqlite3
import statistics
from collections import defaultdict
from typing import Any

from .agreement import pair_agreement, screening_score

DONE = ("submit", "nothing", "flag")  # answers that keep their slot (a skip gives it back)


def _median(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 1) if xs else None


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 4) if xs else None


def answered_tasks(conn: sqlite3.Connection) -> list[dict]:
    """Every answered task with its item and annotator, in answer order (``answered_at``: the latest version's time,
    ``first_answered_at``: the first answer's, which a revision keeps)."""
    rows = conn.execute(
        "SELECT t.*, a.name, i.pair_id, i.kind, i.rejected, i.expected, i.prefill_meta, (SELECT MIN(s.at) FROM "
        "submissions s WHERE s.annotator_id = t.annotator_id AND s.item_id = t.item_id) AS first_answered_at "
        "FROM tasks t JOIN annotators a USING (annotator_id) JOIN items i USING (item_id) WHERE t.status != 'open' "
        "ORDER BY t.answered_at, t.annotator_id").fetchall()
    out = []
    for r in rows:
        d = dict(r)
        d["spans"] = json.loads(d["spans"] or "[]")
        d["expected"] = json.loads(d["expected"]) if d["expected"] else None
        d["stats"] = json.loads(d["stats"]) if d["stats"] else None
        d["prefill_meta"] = json.loads(d["prefill_meta"]) if d["prefill_meta"] else {}
        out.append(d)
    return out


def screening_results(tasks: list[dict], max_edit_ratio: float) -> list[dict]:
    out = []
    for t in tasks:
        if t["kind"] != "screening" or t["status"] == "skip" or not t["expected"]:
            continue
        s = screening_score(t["expected"], t["rejected"], t["status"], t["edited"], t["spans"], t["edit_ratio"],
                            max_edit_ratio)
        out.append({"name": t["name"], "pair_id": t["pair_id"], "action": t["status"], **s})
    return out


def agreement_by_annotator(agreement: list[dict]) -> dict[str, list[float]]:
    """Each annotator's word agreements with the others who answered the same pairs."""
    out: dict[str, list[float]] = defaultdict(list)
    for row in agreement:
        for (a, b), value in zip(itertools.combinations(row["annotators"], 2), row["pairwise_word"]):
            out[a].append(value)
            out[b].append(value)
    return out


def annotator_table(conn: sqlite3.Connection, tasks: list[dict], max_edit_ratio: float,
                    agreement: list[dict] | None = None) -> list[dict]:
    """One row per annotator: counts per action, time per item, edit ratios, agreement with the others,
    screening."""
    rows = {r["annotator_id"]: {"name": r["name"], "admin": bool(r["is_admin"]), "open": 0, "submit": 0,
                                "nothing": 0, "skip": 0, "flag": 0, "times": [], "ratios": []}
            for r in conn.execute("SELECT * FROM annotators ORDER BY annotator_id")}
    for r in conn.execute("SELECT annotator_id, COUNT(*) FROM tasks WHERE status = 'open' GROUP BY annotator_id"):
        rows[r[0]]["open"] = r[1]
    agrees = agreement_by_annotator(agreement or [])
    screening = defaultdict(list)
    for s in screening_results(tasks, max_edit_ratio):
        screening[s["name"]].append(s)
    for t in tasks:
        row = rows[t["annotator_id"]]
        row[t["status"]] += 1
        if t["status"] in DONE:
            row["times"].append(t["active_s"])
        if t["status"] == "submit" and t["edit_ratio"] is not None:
            row["ratios"].append(t["edit_ratio"])
    table = []
    for row in rows.values():
        times, ratios, scr = row.pop("times"), row.pop("ratios"), screening.get(row["name"], [])
        row.update(answered=row["submit"] + row["nothing"] + row["flag"], median_time_s=_median(times),
                   total_time_s=round(sum(times), 1), mean_edit_ratio=_mean(ratios),
                   over_limit=sum(r > max_edit_ratio for r in ratios),
                   agreement_with_others=_mean(agrees.get(row["name"], [])),
                   n_compared=len(agrees.get(row["name"], [])), screening_passed=sum(s["passed"] for s in scr),
                   screening_total=len(scr), screening_score=_mean([s["score"] for s in scr]))
        table.append(row)
    return table


def agreement_table(tasks: list[dict]) -> list[dict]:
    """One row per pair answered (edit or nothing to fix) by two or more annotators, in queue order."""
    by_item: dict[int, list[dict]] = defaultdict(list)
    for t in tasks:
        if t["status"] in ("submit", "nothing") and t["kind"] == "pair":
            by_item[t["item_id"]].append(t)
    out = []
    for item_id, answers in by_item.items():
        if len(answers) < 2:
            continue
        ag = pair_agreement(answers[0]["rejected"], [{"action": a["status"], "edited": a["edited"],
                                                      "spans": a["spans"]} for a in answers])
        out.append({"item_id": item_id, "pair_id": answers[0]["pair_id"], "annotators": [a["name"] for a in answers],
                    "actions": [a["status"] for a in answers], "edit_ratios": [a["edit_ratio"] for a in answers],
                    **ag})
    return sorted(out, key=lambda r: r["item_id"])  # queue order


def overview(conn: sqlite3.Connection, tasks: list[dict], agreement: list[dict], overlap: int) -> dict[str, Any]:
    holders: dict[int, int] = defaultdict(int)
    for t in tasks:
        if t["status"] in DONE and t["kind"] == "pair":
            holders[t["item_id"]] += 1
    word = [r["word_agreement"] for r in agreement if r["word_agreement"] is not None]
    span = [r["span_agreement"] for r in agreement if r["span_agreement"] is not None]
    count = dict(conn.execute("SELECT kind, COUNT(*) FROM items GROUP BY kind").fetchall())
    return {"pairs": count.get("pair", 0), "screening_items": count.get("screening", 0), "overlap": overlap,
            "pairs_answered": len(holders), "pairs_complete": sum(n >= overlap for n in holders.values()),
            "answers": sum(t["status"] in DONE for t in tasks), "pairs_compared": len(agreement),
            "mean_word_agreement": _mean(word), "mean_span_agreement": _mean(span),
            "same_action_rate": _mean([float(r["same_action"]) for r in agreement]),
            "flagged": [{"pair_id": t["pair_id"], "name": t["name"], "reason": t["flag_reason"], "note": t["note"]}
                        for t in tasks if t["status"] == "flag"]}


def admin_report(conn: sqlite3.Connection, overlap: int, max_edit_ratio: float) -> dict[str, Any]:
    tasks = answered_tasks(conn)
    agreement = agreement_table(tasks)
    return {"overview": overview(conn, tasks, agreement, overlap),
            "annotators": annotator_table(conn, tasks, max_edit_ratio, agreement), "agreement": agreement,
            "screening": screening_results(tasks, max_edit_ratio), "max_edit_ratio": max_edit_ratio,
            "ratios": [(t["name"], t["edit_ratio"]) for t in tasks if t["status"] == "submit"],
            "times": [(t["name"], t["active_s"]) for t in tasks if t["status"] in DONE]}


def plot_png(report: dict[str, Any]) -> bytes:
    """Three panels: edit ratios per annotator (with the limit), time per item, pairwise word agreement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in report["annotators"] if r["answered"] or r["skip"]] or ["(nobody yet)"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), dpi=100)
    for ax, key, title, unit in ((axes[0], "ratios", "edit ratio per edit", "edit ratio"),
                                 (axes[1], "times", "active time per item", "seconds")):
        data = [[v for n, v in report[key] if n == name and v is not None] for name in names]
        for k, vals in enumerate(data):
            ax.scatter(vals, [k] * len(vals), alpha=0.6, s=22)
        ax.set_yticks(range(len(names)), [n.replace("$", r"\$") for n in names])  # "$...$" would be TeX
        ax.set_ylim(-0.7, len(names) - 0.3)
        ax.set_xlabel(unit)
        ax.set_title(title, fontsize=10)
    axes[0].axvline(report["max_edit_ratio"], color="tab:red", linestyle="--", linewidth=1)
    axes[0].text(report["max_edit_ratio"], len(names) - 0.4, " limit", color="tab:red", fontsize=8, va="top")
    axes[0].set_xlim(0, 1)
    pairwise = [x for r in report["agreement"] for x in r["pairwise_word"]]
    axes[2].hist(pairwise, bins=[i / 10 for i in range(11)], color="tab:green", alpha=0.8)
    axes[2].set_xlim(0, 1)
    axes[2].set_xlabel("word agreement (Jaccard of changed words)")
    axes[2].set_title(f"agreement of annotator pairs (n={len(pairwise)})", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def progress(conn: sqlite3.Connection, annotator_id: int) -> list[dict]:
    """The annotator's own items, in the order they got them."""
    rows = conn.execute("SELECT t.seq, t.item_id, t.status, t.active_s, t.edit_ratio, t.answered_at, t.revisions, "
                        "i.prompt FROM tasks t JOIN items i USING (item_id) WHERE t.annotator_id = ? "
                        "ORDER BY t.seq", (annotator_id,)).fetchall()
    return [dict(r, prompt=r["prompt"][:120]) for r in rows]


__all__ = ["admin_report", "agreement_table", "annotator_table", "answered_tasks", "overview", "plot_png",
           "progress", "screening_results"]
