"""How the cost of a PPO step grows with the response length and the batch, for finegrain and TRL.

``python benchmarks/run.py --only curves`` measures the points; this module holds what they are,
the fit and the plot. ``python benchmarks/curves.py out.json curves.png`` redraws the plot from
the ``--json`` file of a run.

Each shape is one trial per system (alternating which goes first), in fresh subprocesses:
the median step time after the warm-up steps, and the trial's peak RSS at its last step's end. The growth exponent of a
system along an axis is the least-squares slope of log(step time) against log(size): 1 is
linear growth, below 1 means a fixed cost per step still weighs (sampling's per-token overhead,
optimizer steps), above 1 faster than linear (attention's quadratic term, or waste).
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence


@dataclass(frozen=True)
class Sweep:
    """One model's two sweeps: lengths at a fixed batch, batches at a fixed length."""

    lengths: tuple[int, ...]
    batch: int          # of the length sweep
    batches: tuple[int, ...]
    length: int         # of the batch sweep
    warmup_steps: int   # steps of a trial not timed


SWEEPS = {
    "tiny": Sweep(lengths=(32, 64, 128, 256), batch=16, batches=(8, 16, 32), length=32, warmup_steps=1),
    # SmolLM2-135M: the points that fit the budget (the real arm's shape and one step up on each axis)
    "smollm2": Sweep(lengths=(32, 64), batch=8, batches=(8, 16), length=32, warmup_steps=2),
}


@dataclass(frozen=True)
class Point:
    """One measured shape of one model; it may lie on both sweeps (the corner they share)."""

    model: str      # "tiny" or "smollm2"
    length: int
    batch: int

    @property
    def tag(self) -> str:
        return f"{self.model}_L{self.length}_B{self.batch}"


def points() -> list[Point]:
    """Every shape to measure, each once.

    >>> [p.tag for p in points()][:3]
    ['tiny_L32_B16', 'tiny_L64_B16', 'tiny_L128_B16']
    >>> len(points())  # 4 + 3 tiny shapes sharing one, 2 + 2 SmolLM2 shapes sharing one
    9
    """
    out: list[Point] = []
    for model, sw in SWEEPS.items():
        for pt in [Point(model, n, sw.batch) for n in sw.lengths] + [Point(model, sw.length, b) for b in sw.batches]:
            if pt not in out:
                out.append(pt)
    return out


def on_sweep(row: dict[str, Any], axis: str) -> bool:
    """Whether a measured row (model, length, batch) lies on that model's ``axis`` sweep."""
    sw = SWEEPS[row["model"]]
    return row["batch"] == sw.batch if axis == "length" else row["length"] == sw.length


def fit_exponent(sizes: Sequence[float], times: Sequence[float]) -> float:
    """Least-squares slope of log(time) on log(size); nan with fewer than two distinct sizes.

    >>> round(fit_exponent([32, 64, 128], [1.0, 2.0, 4.0]), 6)
    1.0
    >>> round(fit_exponent([8, 32], [3.0, 6.0]), 6)
    0.5
    >>> math.isnan(fit_exponent([8], [1.0]))
    True
    """
    pts = [(math.log(s), math.log(t)) for s, t in zip(sizes, times) if s > 0 and t > 0 and t == t]
    if len({x for x, _ in pts}) < 2:
        return math.nan
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def fit_sizes(rows: list[dict[str, Any]], model: str, axis: str) -> list[int]:
    """The sizes of ``model``'s ``axis`` sweep that every system with a row on it measured: a point one system
    failed at is left out of both fits, so the two exponents (and their gap) span the same range."""
    by_system = [{r[axis] for r in rows if (r["model"], r["system"]) == (model, system) and on_sweep(r, axis)}
                 for system in ("finegrain", "trl")]
    by_system = [s for s in by_system if s]
    return sorted(set.intersection(*by_system)) if by_system else []


def exponents(rows: list[dict[str, Any]]) -> dict[str, float]:
    """{"<model>_<axis>_<system>": exponent} from measured rows (point fields + system + step_s), each
    system fitted on the sizes both measured (:func:`fit_sizes`)."""
    out: dict[str, float] = {}
    for model in sorted({r["model"] for r in rows}):
        for axis in ("length", "batch"):
            sizes = fit_sizes(rows, model, axis)
            for system in ("finegrain", "trl"):
                sel = [r for r in rows if (r["model"], r["system"]) == (model, system) and on_sweep(r, axis)
                       and r[axis] in sizes]
                if sel:
                    out[f"{model}_{axis}_{system}"] = fit_exponent([r[axis] for r in sel],
                                                                   [r["step_s"] for r in sel])
    return out


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table: one line per point, both systems side by side."""
    lines = ["| model | length | batch | step s finegrain | step s TRL | TRL / finegrain | "
             "peak RSS GB finegrain | peak RSS GB TRL |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    keyed = {(r["model"], r["length"], r["batch"], r["system"]): r for r in rows}
    for p in points():
        fg, trl = (keyed.get((p.model, p.length, p.batch, s)) for s in ("finegrain", "trl"))
        if fg is None or trl is None:
            continue
        lines.append(f"| {p.model} | {p.length} | {p.batch} | {fg['step_s']:.2f} | {trl['step_s']:.2f} | "
                     f"{trl['step_s'] / fg['step_s']:.2f} | {fg['peak_rss_gb']:.2f} | {trl['peak_rss_gb']:.2f} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Step time and peak RSS against response length and batch, log-log, one line per (model, system)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ex = exponents(rows)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    styles = {"finegrain": dict(color="tab:blue", marker="o"), "trl": dict(color="tab:orange", marker="s")}
    for col, axis in enumerate(("length", "batch")):
        for model, dash in (("tiny", "-"), ("smollm2", "--")):
            for system in ("finegrain", "trl"):
                sel = sorted((r for r in rows if (r["model"], r["system"]) == (model, system) and on_sweep(r, axis)),
                             key=lambda r: r[axis])
                if not sel:
                    continue
                xs = [r[axis] for r in sel]
                k = ex.get(f"{model}_{axis}_{system}", math.nan)
                label = f"{system} {model} (exponent {k:.2f})"
                axes[0][col].plot(xs, [r["step_s"] for r in sel], dash, label=label, **styles[system])
                axes[1][col].plot(xs, [r["peak_rss_gb"] for r in sel], dash, label=f"{system} {model}",
                                  **styles[system])
        for row, what in ((0, "PPO step time (s)"), (1, "peak RSS of the trial process (GB)")):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            if row == 0:
                ax.set_yscale("log")
            ax.set_xlabel("response length (tokens)" if axis == "length" else "batch (rollouts per step)")
            ax.set_ylabel(what)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(title or "PPO cost as the work grows: finegrain and TRL 1.12, side by side")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python benchmarks/curves.py RUN.json OUT.png", file=sys.stderr)
        return 2
    state = json.loads(Path(args[0]).read_text())
    rows = state.get("curves", {}).get("rows")
    if not rows:
        print(f"{args[0]}: no curves rows (run benchmarks/run.py --only curves --json ...)", file=sys.stderr)
        return 2
    m = state.get("machine", {})
    plot(rows, args[1], title=f"PPO cost as the work grows ({m.get('cpu', '?')}, {m.get('worker_threads', '?')} "
                              f"threads, {m.get('date', '')})")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
