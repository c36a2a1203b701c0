"""convergence_step_ratio: how much sooner token-reward PPO reaches the sequence system's gold reward.

Definition (also in RESULTS.md), per seed of ``finegrain demo``:

1. ``g_k(t)``, t = 0..T-1: the demo's per-PPO-step mean gold reward of system k's rollouts.
2. Smoothing: trailing moving average over ``window`` steps, ``s_k(t) = mean(g_k(max(0, t-w+1)..t))``,
   ``w = max(3, round(T / 10))`` (causal, so a step is never credited with later rewards).
3. Target: 90 % of the sequence system's *gain*: ``target = s_seq(0) + 0.9 (s_seq(T-1) - s_seq(0))``.
   (90 % of the raw final value is meaningless when gold rewards are negative or start high.)
4. ``steps_k`` = 1 + the first t with ``s_k(t) >= target`` (steps taken, so >= 1); a system
   that never reaches it counts T + 1 (censored, noted).
5. ratio = ``steps_token / steps_seq``; seeds where the sequence system gains nothing are
   skipped (undefined); the figure is the median over seeds.

The sequence system is the paper's standard PPO-RLHF baseline (``baseline``: sequence RM on
the original pairs); the same ratio against ``edit_seq`` (sequence RM on the edited pairs) is
reported beside it. Each (demo seed, PPO seed) pair of curves is one sample.

>>> smooth([0, 0, 3, 3, 3, 3], 3)
[0.0, 0.0, 1.0, 2.0, 3.0, 3.0]
>>> steps_to_reach([0.0, 0.5, 0.95, 1.0], 0.9)
3
>>> steps_to_reach([0.0, 0.5], 0.9)
3
>>> ratio_for_seed([0, 0, 0, 1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1, 1, 1, 1], window=1)["ratio"]
0.5
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Sequence

TARGET_FRACTION = 0.9


def smooth(curve: Sequence[float], window: int) -> list[float]:
    """Trailing moving average: s(t) = mean(curve[max(0, t - window + 1) : t + 1])."""
    out = []
    for t in range(len(curve)):
        part = curve[max(0, t - window + 1): t + 1]
        out.append(float(sum(part)) / len(part))
    return out


def default_window(n_steps: int) -> int:
    return max(3, round(n_steps / 10))


def steps_to_reach(smoothed: Sequence[float], target: float) -> int:
    """PPO steps taken until the smoothed curve first reaches ``target`` (len + 1 if never)."""
    for t, v in enumerate(smoothed):
        if v >= target:
            return t + 1
    return len(smoothed) + 1


def ratio_for_seed(seq_curve: Sequence[float], tok_curve: Sequence[float], window: int | None = None) -> dict[str, Any]:
    n = min(len(seq_curve), len(tok_curve))
    if n < 2:
        raise ValueError(f"curves too short ({n} steps)")
    w = window or default_window(n)
    s_seq, s_tok = smooth(seq_curve[:n], w), smooth(tok_curve[:n], w)
    gain = s_seq[-1] - s_seq[0]
    if gain <= 0:
        return {"ratio": math.nan, "reason": f"sequence system gained nothing ({gain:+.4f})", "window": w}
    target = s_seq[0] + TARGET_FRACTION * gain
    n_seq, n_tok = steps_to_reach(s_seq, target), steps_to_reach(s_tok, target)
    return {"ratio": n_tok / n_seq, "steps_seq": n_seq, "steps_token": n_tok, "censored": n_tok > n,
            "target": target, "window": w, "n_steps": n}


# ---------------------------------------------------------------- reading the demo's metrics.json

BASELINE, FG_SEQUENCE, TOKEN = "baseline", "edit_seq", "edit_token"  # finegrain.sandbox.demo.SYSTEMS


def gold_curves(metrics: dict[str, Any]) -> dict[str, list[list[float]]]:
    """{system: [per-step gold reward curve of each PPO seed]} from a demo metrics.json
    (``systems.<name>.runs[k].ppo.curve.gold_reward``)."""
    out = {}
    for name, sysm in metrics["systems"].items():
        out[name] = [[float(v) for v in run["ppo"]["curve"]["gold_reward"] if v is not None] for run in sysm["runs"]]
    return out


def convergence_summary(all_metrics: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Median ratio over every (demo seed, PPO seed) vs the baseline, plus the same vs the edit_seq system."""
    per_seed, vs_fg = [], []
    for m in all_metrics:
        curves = gold_curves(m)
        for k, tok in enumerate(curves[TOKEN]):
            per_seed.append(ratio_for_seed(curves[BASELINE][k], tok))
            if FG_SEQUENCE in curves:
                vs_fg.append(ratio_for_seed(curves[FG_SEQUENCE][k], tok)["ratio"])
    ratios = [r["ratio"] for r in per_seed if not math.isnan(r["ratio"])]
    if not ratios:
        raise ValueError("undefined on every seed: " + "; ".join(r.get("reason", "") for r in per_seed))
    med = statistics.median(ratios)
    fg = [x for x in vs_fg if not math.isnan(x)]
    censored = sum(1 for r in per_seed if r.get("censored"))
    note = (f"median over {len(ratios)} seed(s) of steps(token system) / steps(baseline) to reach 90% of the "
            f"baseline's smoothed gold-reward gain; per seed {[round(x, 3) for x in ratios]}"
            + (f"; {len(per_seed) - len(ratios)} seed(s) undefined (baseline gained nothing)"
               if len(ratios) < len(per_seed) else "")
            + (f"; {censored} censored (token system never reached it)" if censored else "")
            + (f"; vs the edit_seq system: median {statistics.median(fg):.3f}" if fg else ""))
    return {"median": med, "per_seed": per_seed, "vs_fg_sequence": vs_fg, "note": note}


if __name__ == "__main__":
    import doctest

    doctest.testmod(verbose=False)
