"""Reward curves of PPO runs (PNG) from their metrics.jsonl files.

    python plot_rewards.py OUT/curves.png seq=runs/ppo_seq token=runs/ppo_token [--keys reward kl]

One panel per metric key (default: ``reward`` = the RM score of the step's rollouts, and ``kl``),
one line per run; a light line is the raw per-step value, the dark one a moving average.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from finegrain.io import iter_records


def read_metrics(run_dir: str) -> list[dict]:
    """The metrics.jsonl records of a run, in step order."""
    rows = [r for _, r in iter_records(Path(run_dir) / "metrics.jsonl")]
    return sorted(rows, key=lambda r: r["step"])


def moving_average(xs: list[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values (the first values average what exists)."""
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= window:
            acc -= xs[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot(out_png: str, runs: dict[str, list[dict]], keys: list[str], window: int = 5) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for i, (label, rows) in enumerate(runs.items()):
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if not pts:
                continue
            steps, ys = zip(*pts)
            color = f"C{i}"
            ax.plot(steps, ys, color=color, alpha=0.3, lw=1)
            ax.plot(steps, moving_average(list(ys), window), color=color, lw=2, label=label)
        ax.set_xlabel("PPO step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("output", help="PNG file to write")
    ap.add_argument("runs", nargs="+", help="LABEL=RUN_DIR (each holding metrics.jsonl)")
    ap.add_argument("--keys", nargs="+", default=["reward", "kl"], help="metric keys, one panel each")
    ap.add_argument("--window", type=int, default=5, help="moving-average window in steps")
    args = ap.parse_args()
    runs = {}
    for spec in args.runs:
        label, _, path = spec.partition("=")
        runs[label] = read_metrics(path)
    plot(args.output, runs, args.keys, args.window)
    print(args.output)


if __name__ == "__main__":
    main()
