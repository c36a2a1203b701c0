"""`finegrain demo --quick` end to end: every report file, valid PNGs, escaped HTML, three systems with numbers."""
from __future__ import annotations

import json
import math
import struct

import pytest

from finegrain.cli import main


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    assert main(["demo", "--quick", "--out", str(out), "--seed", "0"]) == 0
    return out


@pytest.mark.slow
def test_demo_quick_writes_every_artefact(quick_run):
    out = quick_run
    for name in ("metrics.json", "report.md", "report.html", "token_rewards.html", "sft/demos.jsonl",
                 "data/pairs.jsonl", "data/edits.jsonl", "data/heldout.jsonl", "eval/outputs/sft.jsonl"):
        assert (out / name).exists(), name
    for rm in ("seq_pref", "seq_edit", "token_edit", "token_mean"):
        assert (out / "rm" / rm / "finegrain.json").exists() and (out / "rm" / rm / "eval.json").exists()
    for png in ("ppo_gold_reward.png", "ppo_kl.png", "rm_accuracy.png"):
        w, h = _png_size(out / png)
        assert w > 100 and h > 100
        assert f"({png})" in (out / "report.md").read_text()
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["systems"]) == {"baseline", "edit_seq", "edit_token"}
    for name, sysm in m["systems"].items():
        assert 0.0 <= sysm["win_rate"] <= 1.0 and math.isfinite(sysm["gold_reward"])
        run = sysm["runs"][0]
        assert len(run["ppo"]["curve"]["gold_reward"]) == m["sizes"]["ppo_steps"]
        assert (out / "ppo" / f"{name}-s0" / "final" / "finegrain.json").exists()
        assert (out / "eval" / "winrate" / f"{name}-s0.json").exists()
    for rm in m["rm"].values():
        assert 0.0 <= rm["accuracy"] <= 1.0
    assert m["rm"]["token_edit"]["token_auroc_source"] == "gold_spans"
    # the SFT policy must have something to fix, and the record says how much
    assert m["samples"]["sft_samples"]["flaw_rate"] > 0.05
    assert abs(m["annotate"]["observed_disagreement"] - m["config"]["noise"]) < 0.15
    assert m["edit"]["min_gold_gain"] > 0
    # every line of every edited pair file carries gold spans of its rejected response
    edits = [json.loads(x) for x in (out / "data" / "edits.jsonl").read_text().splitlines()]
    assert edits and all("gold_spans" in e and e["edited"] != e["rejected"] for e in edits)


@pytest.mark.slow
def test_demo_resumes_and_report_escapes(quick_run, capsys):
    from finegrain.sandbox.report import html_report

    assert main(["demo", "--quick", "--out", str(quick_run), "--seed", "0"]) == 0
    err = capsys.readouterr().err
    assert "sft: reusing" in err and "ppo_edit_token_s0: reusing" in err and ": running" not in err
    m = json.loads((quick_run / "metrics.json").read_text())
    m["example"] = {"prompt": "<script>alert(1)</script>", "outputs": {"sft": {"text": "a & b <i>", "gold": 0.0}}}
    page = html_report(m, ["ppo_kl.png"], None)
    assert "<script>" not in page and "&lt;script&gt;" in page and "a &amp; b &lt;i&gt;" in page
    assert "<script" not in (quick_run / "report.html").read_text()


def test_demo_bad_options_exit_2(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--noise", "0.7"]) == 2
    assert "--noise" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path), "--n-eval-prompts", "500"]) == 2


def test_report_curve_helpers_exact():
    from finegrain.sandbox.report import mean_curve, running_mean, steps_to_fraction, steps_to_level

    assert running_mean([1.0, 3.0, 5.0, 7.0], window=2) == [1.0, 2.0, 4.0, 6.0]
    # running means (window 2): 0, 0.5, 1.5, 2.5, 3.0 -> best gain 3.0; 90% = 2.7 first reached at step 5
    assert steps_to_fraction([1, 2, 3, 4, 5], [0.0, 1.0, 2.0, 3.0, 3.0], frac=0.9, window=2) == 5
    assert steps_to_fraction([1, 2, 3, 4, 5], [0.0, 1.0, 2.0, 3.0, 3.0], frac=0.5, window=2) == 3
    assert steps_to_fraction([1, 2], [1.0, 0.0], window=1) is None  # no gain: no speed to report
    assert steps_to_level([1, 2, 3, 4], [0.0, 2.0, 2.0, 4.0], 2.0, window=2) == 3  # running means 0, 1, 2, 3
    assert steps_to_level([1, 2], [0.0, 0.0], 1.0) is None
    runs = [{"ppo": {"curve": {"step": [1, 2], "kl": [0.0, 2.0]}}}, {"ppo": {"curve": {"step": [1, 2], "kl": [1.0, None]}}}]
    assert mean_curve(runs, "kl") == ([1, 2], [0.5, 2.0])


def test_aggregate_over_seeds_exact():
    from finegrain.sandbox.demo import aggregate

    runs = [{"eval": {"win_rate": w, "se": 0.03, "gold": {"gold_reward": g, "flaw_rate": 0.5}}}
            for w, g in ((0.5, 1.0), (0.6, 2.0), (0.7, 3.0))]
    a = aggregate(runs)
    assert a["win_rate"] == pytest.approx(0.6) and a["gold_reward"] == pytest.approx(2.0)
    assert a["win_rate_se"] == pytest.approx(0.1 / 3 ** 0.5)  # std over seeds 0.1, k = 3
    assert a["win_rate_judge_se"] == pytest.approx((3 * 0.03 ** 2) ** 0.5 / 3)
    one = aggregate(runs[:1])
    assert one["win_rate_se"] == pytest.approx(0.03)  # one seed: the judge's own standard error
