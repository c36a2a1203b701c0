"""Robustness of the sandbox results: the demo's figures over demo seeds nobody tuned on.

The seeds are fixed here, before any result on them was seen (the defaults were chosen on demo
seed 0 and on the RM sweep's validation pairs): ``SEEDS = (3, 4, 5, 6, 7)``. For each seed, one
full ``finegrain demo`` and one ``finegrain demo --quick`` (the newcomer preset). Figures, from
the metrics.json of each run:

- ``robust_token_minus_edit_seq_gold`` / ``_winrate``: the token system minus the edit-data
  sequence system, per seed (each the mean over that demo's PPO seeds), then the mean over demo
  seeds with its standard error (std over seeds / sqrt(n)); the same against the baseline;
- ``robust_rm_accuracy_gap``: the token system's RM minus the baseline sequence RM, accuracy on the
  held-out gold-ordered pairs (Table 2), mean over seeds;
- ``robust_response_auroc``: the token system's RM, mean per-response AUROC against the gold
  flawed tokens, mean over seeds;
- ``robust_convergence_step_ratio``: convergence.py's ratio, median over every (demo, PPO) seed;
- ``newcomer_gold_rose``: in how many seeds the --quick run's gold reward at the last PPO step is
  above step 1 for all three systems.

>>> mean_se([1.0, 2.0, 3.0])
(2.0, 0.5773502691896258)
>>> gold_rose({"systems": {"a": {"runs": [{"ppo": {"curve": {"gold_reward": [0.1, 0.5]}}}]},
...                        "b": {"runs": [{"ppo": {"curve": {"gold_reward": [0.2, 0.1]}}}]}}})
False
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Sequence

SEEDS = (3, 4, 5, 6, 7)
TOKEN, FG_SEQUENCE, BASELINE = "edit_token", "edit_seq", "baseline"


def mean_se(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (sample std / sqrt(n); nan for one value)."""
    n = len(xs)
    mu = sum(xs) / n
    return mu, (statistics.stdev(xs) / math.sqrt(n) if n > 1 else math.nan)


def gold_rose(metrics: dict[str, Any]) -> bool:
    """Every system's first PPO run ends with a higher rollout gold reward than it started with."""
    curves = [s["runs"][0]["ppo"]["curve"]["gold_reward"] for s in metrics["systems"].values()]
    return all(c[-1] > c[0] for c in curves)


def differences(all_metrics: Sequence[dict[str, Any]], key: str, other: str) -> list[float]:
    """Per demo seed: token system minus ``other`` on ``key`` (gold_reward or win_rate, means over PPO seeds)."""
    return [m["systems"][TOKEN][key] - m["systems"][other][key] for m in all_metrics]


def token_rm(metrics: dict[str, Any]) -> dict[str, Any]:
    return metrics["rm"][metrics["systems"][TOKEN]["reward_model"]]


def robustness_summary(full: Sequence[dict[str, Any]], quick: Sequence[dict[str, Any]]) -> dict[str, tuple[float, str]]:
    """RESULT figures (value, note) from the full and --quick demos' metrics.json."""
    from convergence import convergence_summary

    out: dict[str, tuple[float, str]] = {}
    seeds = [m["config"]["seed"] for m in full]
    for other, tag in ((FG_SEQUENCE, "edit_seq"), (BASELINE, "baseline")):
        for key, name, scale in (("gold_reward", "gold", 1.0), ("win_rate", "winrate", 100.0)):
            d = [scale * x for x in differences(full, key, other)]
            mu, se = mean_se(d)
            out[f"robust_token_minus_{tag}_{name}"] = (
                mu, f"mean ± SE over demo seeds {seeds}: {mu:+.3f} ± {se:.3f}"
                    + (" (win-rate points)" if scale != 1 else "") + f"; per seed {[round(x, 3) for x in d]}; "
                    + ("no standard error from one seed" if se != se else
                       ("beyond" if abs(mu) > 2 * se else "within") + " two standard errors"))
    gaps = [100 * (token_rm(m)["accuracy"] - m["rm"]["seq_pref"]["accuracy"]) for m in full]
    mu, se = mean_se(gaps)
    out["robust_rm_accuracy_gap"] = (mu, f"token RM minus baseline sequence RM, accuracy points: {mu:+.1f} ± {se:.1f}; "
                                         f"per seed {[round(x, 1) for x in gaps]}")
    aucs = [token_rm(m).get("response_auroc") for m in full]
    aucs = [a for a in aucs if a is not None]
    if aucs:
        mu, se = mean_se(aucs)
        out["robust_response_auroc"] = (mu, f"token RM, per-response AUROC vs gold flawed tokens: {mu:.3f} ± {se:.3f}; "
                                            f"per seed {[round(x, 3) for x in aucs]}")
    else:
        out["robust_response_auroc"] = (math.nan, "no full demo's token RM reported a per-response AUROC")
    try:
        conv = convergence_summary(full)
        out["robust_convergence_step_ratio"] = (conv["median"], conv["note"])
    except (KeyError, ValueError) as e:
        out["robust_convergence_step_ratio"] = (math.nan, f"undefined: {e}")
    if quick:
        rose = [gold_rose(m) for m in quick]
        out["newcomer_gold_rose"] = (sum(rose), f"--quick runs where every system's last-step gold reward beats step 1: "
                                                f"{sum(rose)} of {len(rose)} (seeds {[m['config']['seed'] for m in quick]})")
    else:
        out["newcomer_gold_rose"] = (math.nan, "no --quick demo finished")
    return out


if __name__ == "__main__":
    import doctest

    doctest.testmod(verbose=False)
