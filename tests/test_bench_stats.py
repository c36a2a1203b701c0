"""The benchmarks' statistics on hand-made inputs: growth-exponent fits, the robustness summary, whatif's plan."""
from __future__ import annotations

import importlib
import math
import os
from dataclasses import replace

import pytest


def _step_s(model: str, length: int, batch: int, system: str) -> float:
    """0.5 s + 10 ms per token at batch 16, linear in the batch; TRL exactly twice finegrain: the same growth."""
    return (0.5 + 0.01 * length) * batch / 16 * (2 if system == "trl" else 1)


def test_a_point_one_system_failed_is_left_out_of_both_fits(bench_run):
    curves = importlib.import_module("curves")
    rows = [{"model": "tiny", "length": n, "batch": 16, "system": s, "step_s": _step_s("tiny", n, 16, s),
             "peak_rss_gb": 1.0} for n in curves.SWEEPS["tiny"].lengths for s in ("finegrain", "trl")
            if (n, s) != (256, "trl")]  # TRL's 256-token trial failed
    ex = curves.exponents(rows)
    # both through (32, 0.82), (64, 1.14), (128, 1.78) (x 2 for TRL): three equally spaced log sizes, so the
    # least-squares slope is (ln 1.78 - ln 0.82) / (2 ln 2) = 0.55909; finegrain's 256 point left out too
    assert ex["tiny_length_finegrain"] == pytest.approx(0.55909, abs=1e-5)
    assert ex["tiny_length_trl"] == pytest.approx(0.55909, abs=1e-5)
    assert curves.fit_sizes(rows, "tiny", "length") == [32, 64, 128]
    # one system alone (the other failed everywhere): fitted on its own sizes, nothing to pair it with
    alone = [r for r in rows if r["system"] == "finegrain"]
    assert curves.fit_sizes(alone, "tiny", "length") == [32, 64, 128, 256]
    assert curves.exponents(alone)["tiny_length_finegrain"] == pytest.approx(0.6342, abs=1e-3)
    assert "tiny_length_trl" not in curves.exponents(alone)


def test_curve_gap_compares_the_same_sizes_and_says_a_trial_failed(bench_run, tmp_path, monkeypatch):
    def fake_worker(task, assets, logs, tag, **kw):
        _, model, length, batch, system = tag.split("_")
        if (model, length, system) == ("tiny", "L256", "trl"):
            raise bench_run.BenchFailed(f"{tag} exited 1: out of memory")
        step = _step_s(model, int(length[1:]), int(batch[1:]), system)
        return {"step_s": [99.0, 99.0, step, step, step], "peak_rss_gb": 1.0}  # warm-up steps first

    monkeypatch.setattr(bench_run, "worker", fake_worker)
    monkeypatch.setattr(bench_run, "build_in_child", lambda *a, **k: None)
    monkeypatch.setattr(bench_run, "policy_with_length", lambda where, n: f"policy_L{n}")
    out = bench_run.bench_curves(replace(bench_run.QUICK, plot=None), tmp_path / "assets", tmp_path, {})
    gap, note = out["curve_tiny_length_exponent_gap"]
    assert gap == pytest.approx(0.0, abs=1e-9)  # was 0.559 - 0.634 = -0.075: TRL fitted on 32-128, finegrain 32-256
    assert "over length [32, 64, 128]" in note and "1 trial(s) failed" in note
    assert out["curve_tiny_batch_exponent_gap"][0] == pytest.approx(0.0, abs=1e-9)
    assert out["curve_smollm2_length_exponent_gap"][0] == pytest.approx(0.0, abs=1e-9)


def _metrics(seed: int, token_gold: float, base_gold: float, *, auroc: float | None = 0.9) -> dict:
    curve = {"gold_reward": [0.0, 0.2, 0.5, 0.8, 1.0, 1.0]}
    systems = {}
    for name, gold, rm in (("edit_token", token_gold, "token_edit"), ("edit_seq", base_gold, "seq_edit"),
                           ("baseline", base_gold, "seq_pref")):
        systems[name] = {"gold_reward": gold, "win_rate": 0.5, "reward_model": rm,
                         "runs": [{"ppo": {"curve": curve}}]}
    token = {"accuracy": 0.8} | ({"response_auroc": auroc} if auroc is not None else {})
    return {"config": {"seed": seed}, "systems": systems,
            "rm": {"token_edit": token, "seq_edit": {"accuracy": 0.7}, "seq_pref": {"accuracy": 0.7}}}


def test_robustness_mean_se_and_the_two_standard_error_verdict(bench_run):
    robustness = importlib.import_module("robustness")
    # differences 0.2 and 0.4: mean 0.3, sample std 0.1414, SE 0.1414 / sqrt(2) = 0.1; 0.3 > 2 x 0.1
    out = robustness.robustness_summary([_metrics(3, 0.7, 0.5), _metrics(4, 0.9, 0.5)], [_metrics(3, 0.7, 0.5)])
    value, note = out["robust_token_minus_baseline_gold"]
    assert value == pytest.approx(0.3)
    assert "+0.300 ± 0.100" in note and note.endswith("beyond two standard errors")
    # 0.1 and 0.3: mean 0.2 = exactly 2 SE, not beyond
    out = robustness.robustness_summary([_metrics(3, 0.6, 0.5), _metrics(4, 0.8, 0.5)], [])
    assert out["robust_token_minus_baseline_gold"][1].endswith("within two standard errors")


def test_robustness_with_one_seed_or_no_quick_run_says_so_instead_of_a_verdict_or_silence(bench_run):
    robustness = importlib.import_module("robustness")
    out = robustness.robustness_summary([_metrics(3, 0.9, 0.5, auroc=None)], [])
    value, note = out["robust_token_minus_baseline_gold"]
    assert value == pytest.approx(0.4)
    # one seed has no standard error: no "within two standard errors" verdict (0.4 > 2 x nan is False)
    assert "two standard errors" not in note and "no standard error from one seed" in note
    # every figure of the benchmark is still printed: nan with the reason, not left out
    names = bench_run.BENCHES["robust"][1]
    assert set(names) <= set(out)
    assert math.isnan(out["newcomer_gold_rose"][0]) and "no --quick demo" in out["newcomer_gold_rose"][1]
    assert math.isnan(out["robust_response_auroc"][0])


def test_whatif_plans_a_step_for_every_warm_up_and_every_round(bench_run):
    saved = dict(os.environ)  # whatif sets a few environment defaults at import: keep them out of other tests
    try:
        whatif = importlib.import_module("whatif")
    finally:
        os.environ.clear()
        os.environ.update(saved)
    # 9 variants (base + 8): 9 warm-up steps, then 6 rounds of 9; was 6 x 9 + 2 = 56, so the linear
    # schedule's learning rate hit 0 at step 56 and went negative for the last 7 timed steps
    assert whatif.planned_steps(6, 9) == 63
    assert whatif.planned_steps(1, 1) == 2
