"""Collect the eval-rm results of run.sh into one Markdown table (and results.json).

    python make_table.py runs/qa_feedback          # reads RUN/<rm>/eval_*.json, RUN/<rm>/train_seconds.txt

Each reward model directory ``RUN/<name>`` holds ``eval_preference.json`` (held-out human
preferences), ``eval_edit.json`` (held-out human edit pairs, with the token AUROC against the
human error spans) and ``train_seconds.txt`` (wall-clock training time written by run.sh).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from finegrain.io import read_json, write_json

# (directory, what it was trained on, loss)
ROWS = [
    ("a_seq_pref", "human preferences, one per question (chosen > rejected)", "sequence"),
    ("a_seq_pref_all", "all human preferences (5.4 per question)", "sequence"),
    ("b_seq_edit", "human edits (corrected > prediction 1)", "sequence"),
    ("c_token_edit", "human edits (corrected > prediction 1)", "token_edit (Eq. 4)"),
    ("d_token_mean", "human edits (corrected > prediction 1)", "token_mean (Eq. 1-3)"),
    ("e_token_label", "human edits, question only", "token_label (per-token labels)"),
    ("f_token_label_passages", "human edits, with the passages (512 tokens)", "token_label (per-token labels)"),
    ("g_token_mean_label_passages", "human edits, with the passages (512 tokens)", "token_mean + labels"),
]


def pct(res: dict | None, key: str = "accuracy", se_key: str | None = "accuracy_se") -> str:
    if not res or res.get(key) is None:
        return "—"
    text = f"{100 * res[key]:.1f}"
    if se_key and res.get(se_key) is not None:
        text += f" ± {100 * res[se_key]:.1f}"
    return text


def auroc(res: dict | None) -> str:
    if not res:
        return "—"
    for key in ("token_auroc_gold", "token_auroc"):
        if res.get(key) is not None:
            return f"{res[key]:.3f}"
    return "—"


def fmt3(res: dict | None, key: str) -> str:
    return f"{res[key]:.3f}" if res and res.get(key) is not None else "—"


def read_times(run: Path) -> dict[str, float]:
    """Training seconds of each RM directory that has them."""
    return {p.parent.name: float(p.read_text()) for p in sorted(run.glob("*/train_seconds.txt"))}


def load(run: Path, name: str, which: str) -> dict | None:
    path = run / name / f"eval_{which}.json"
    return read_json(path) if path.exists() else None


def table(run: Path) -> tuple[str, dict]:
    times = read_times(run)
    lines = ["| RM | trained on | loss | held-out human preferences | held-out edit pairs | "
             "token AUROC vs human error spans | per-response AUROC | span F1 | train time |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    results = {}
    for name, data, loss in ROWS:
        pref, edit = load(run, name, "preference"), load(run, name, "edit")
        if pref is None and edit is None:
            continue
        results[name] = {"preference": pref, "edit": edit, "train_seconds": times.get(name)}
        t = f"{times[name] / 60:.1f} min" if name in times else "—"
        token = not loss.startswith("sequence")
        tok_auc = auroc(edit) if token else "n/a (one score)"
        extra = [fmt3(edit, "response_auroc"), fmt3(edit, "span_f1")] if token else ["—", "—"]
        lines.append(f"| ({name[0]}{'+' if name.endswith('_all') else ''}) | {data} | {loss} | {pct(pref)} (n={pref and pref.get('n_pairs')}) | "
                     f"{pct(edit)} (n={edit and edit.get('n_pairs')}) | {tok_auc} | {' | '.join(extra)} | {t} |")
    return "\n".join(lines), results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="the run directory of run.sh")
    args = ap.parse_args()
    run = Path(args.run)
    md, results = table(run)
    write_json(run / "results.json", results)
    (run / "results.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
