"""Markdown report of the PPO runs: reward at the start and end, run time, and greedy answers to
held-out questions before and after, each scored by the reward model (Eq. 1 mean for a token RM).

    python before_after.py RM_DIR OUT sequence token > OUT/before_after.md

Reads OUT/before.jsonl and OUT/after_<mode>.jsonl (``finegrain generate`` outputs), and
OUT/<mode>/metrics.jsonl and OUT/<mode>.seconds.txt of each mode.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from finegrain.io import iter_records


def rows(path: Path) -> list[dict]:
    return [r for _, r in iter_records(path)]


def window_mean(metrics: list[dict], key: str, first: bool, k: int = 1) -> float | None:
    vals = [m[key] for m in metrics if m.get(key) is not None]
    if not vals:
        return None
    part = vals[:k] if first else vals[-k:]
    return statistics.fmean(part)


def run_summary(out: Path, modes: list[str]) -> list[str]:
    lines = ["| reward mode | steps | RM score, first step | RM score, last step | summed KL, last step | "
             "wall time |", "| --- | --- | --- | --- | --- | --- |"]
    for mode in modes:
        metrics = sorted(rows(out / mode / "metrics.jsonl"), key=lambda m: m["step"])
        secs = out / f"{mode}.seconds.txt"
        t = f"{float(secs.read_text()) / 60:.1f} min" if secs.exists() else "—"
        r0, r1, kl = window_mean(metrics, "reward", True), window_mean(metrics, "reward", False), \
            window_mean(metrics, "kl", False)
        fmt = lambda x: "—" if x is None else f"{x:+.4f}"  # noqa: E731
        lines.append(f"| {mode} | {len(metrics)} | {fmt(r0)} | {fmt(r1)} | {fmt(kl)} | {t} |")
    return lines


def answers(rm_dir: str, out: Path, modes: list[str]) -> list[str]:
    from finegrain.rm import RewardModel

    rm = RewardModel.load(rm_dir)
    systems = [("base SmolLM2-135M-Instruct", rows(out / "before.jsonl"))]
    systems += [(f"PPO, {mode} reward", rows(out / f"after_{mode}.jsonl")) for mode in modes]
    lines = []
    means = []
    for name, recs in systems:
        scores = rm.score([r["instruction"] for r in recs], [r["output"] for r in recs])
        means.append((name, statistics.fmean(scores), statistics.fmean(len(r["output"].split()) for r in recs)))
        for r, s in zip(recs, scores):
            r["_score"] = s
    lines += ["| policy | mean RM score (held-out, greedy) | mean words |", "| --- | --- | --- |"]
    lines += [f"| {n} | {s:+.4f} | {w:.1f} |" for n, s, w in means]
    for i, base in enumerate(systems[0][1]):
        lines += ["", f"**Q: {base['instruction']}**", ""]
        for name, recs in systems:
            text = " ".join(recs[i]["output"].split())
            lines.append(f"- *{name}* (RM {recs[i]['_score']:+.3f}): {text}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rm", help="the reward model directory")
    ap.add_argument("out", help="the PPO example's output directory")
    ap.add_argument("modes", nargs="+", help="reward modes that were run")
    args = ap.parse_args()
    out = Path(args.out)
    print("\n".join(run_summary(out, args.modes) + [""] + answers(args.rm, out, args.modes)))


if __name__ == "__main__":
    main()
