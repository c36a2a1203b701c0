"""Split converted qa-feedback files into train/test by QUESTION, so no question is on both sides.

Each qa-feedback question yields several records (six human pairwise preferences among four
sampled answers, and one human-corrected answer), all with the same ``question_id`` and prompt. A split by pair
id (what ``finegrain train-rm --eval-fraction`` does) would put pairs of the same question on
both sides and flatter the held-out accuracy, so this script groups records by their prompt and
assigns whole groups (by ``question_id``, else by prompt).

    python split_by_question.py converted/pairs.jsonl converted/edits.jsonl --out split --test-fraction 0.2

writes ``split/train/pairs.jsonl``, ``split/test/pairs.jsonl``, ``split/train/edits.jsonl``, ...
(records unchanged) and prints the counts as JSON. Deterministic given ``--seed``.

With ``--one-per-question`` it also writes ``split/train/<name>.one_per_question.jsonl``: one
seeded-random record per training question, e.g. one human preference per question, as many
pairs as there are human edits (the paper compares the two kinds of data at equal pair count).
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from finegrain.errors import InputError
from finegrain.io import iter_records, write_jsonl


def question_key(record: dict, path: str, where: str) -> str:
    """The grouping key of a record: its ``question_id`` (written by ``finegrain convert --from
    qa-feedback``), else its prompt (one question = one prompt)."""
    if record.get("question_id") is not None:
        return str(record["question_id"])
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("must be a non-empty string", path=path, record=where, field="prompt")
    return prompt


def test_questions(keys: set[str], fraction: float, seed: int) -> set[str]:
    """A seeded random ``fraction`` of ``keys`` (at least one when ``fraction > 0``)."""
    ordered = sorted(keys)
    random.Random(seed).shuffle(ordered)
    n_test = max(1, round(fraction * len(ordered))) if fraction > 0 else 0
    return set(ordered[:n_test])


def one_per_question(rows: list[tuple[str, dict]], seed: int) -> list[dict]:
    """One seeded-random record of each question, in order of first appearance."""
    groups: dict[str, list[dict]] = {}
    for key, rec in rows:
        groups.setdefault(key, []).append(rec)
    rng = random.Random(seed)
    return [rng.choice(recs) for recs in groups.values()]


def split_files(paths: list[str], out: Path, fraction: float, seed: int, subsample: bool = False) -> dict:
    records = {p: [(question_key(r, p, where), r) for where, r in iter_records(p)] for p in paths}
    keys = {k for rows in records.values() for k, _ in rows}
    held_out = test_questions(keys, fraction, seed)
    summary: dict = {"n_questions": len(keys), "n_test_questions": len(held_out), "seed": seed, "files": {}}
    for p, rows in records.items():
        name = Path(p).name
        test = [r for k, r in rows if k in held_out]
        train = [r for k, r in rows if k not in held_out]
        write_jsonl(out / "train" / name, train)
        write_jsonl(out / "test" / name, test)
        summary["files"][name] = {"train": len(train), "test": len(test)}
        if subsample:
            sub = one_per_question([(k, r) for k, r in rows if k not in held_out], seed)
            sub_name = name.split(".")[0] + ".one_per_question.jsonl"
            write_jsonl(out / "train" / sub_name, sub)
            summary["files"][name]["train_one_per_question"] = len(sub)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", help="converted files (pairs.jsonl, edits.jsonl) of the same questions")
    ap.add_argument("--out", required=True, help="output directory (train/ and test/ are made in it)")
    ap.add_argument("--test-fraction", type=float, default=0.2, help="fraction of questions held out")
    ap.add_argument("--seed", type=int, default=0, help="seed of the question shuffle")
    ap.add_argument("--one-per-question", action="store_true",
                    help="also write train/<name>.one_per_question.jsonl (one random record per question)")
    args = ap.parse_args()
    summary = split_files(args.inputs, Path(args.out), args.test_fraction, args.seed, args.one_per_question)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
