"""`finegrain demo` end to end: --smoke writes every report file (valid PNGs, escaped HTML, three systems with
numbers); --quick, the first run a newcomer makes, shows PPO raising the gold reward of every system."""
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
    """The smoke preset (every stage, tiny sizes); named for what the tests use it for: a quick run."""
    out = tmp_path_factory.mktemp("demo") / "run"
    assert main(["demo", "--smoke", "--out", str(out), "--seed", "0"]) == 0
    return out


@pytest.mark.slow
def test_demo_smoke_writes_every_artefact(quick_run):
    out = quick_run
    for name in ("metrics.json", "report.md", "report.html", "token_rewards.html", "sft/demos.jsonl",
                 "data/pairs.jsonl", "data/edits.jsonl", "data/heldout.jsonl", "data/rmval.jsonl",
                 "eval/outputs/sft.jsonl"):
        assert (out / name).exists(), name
    for rm in ("seq_pref", "seq_edit", "token_edit", "token_mean", "token_label", "token_mean_label"):
        assert (out / "rm" / rm / "finegrain.json").exists() and (out / "rm" / rm / "eval_heldout.json").exists()
        assert (out / "rm" / rm / "eval_rmval.json").exists()
    # evaluation and validation pairs come from disjoint prompt draws
    read = lambda f: [json.loads(x) for x in (out / "data" / f).read_text().splitlines()]  # noqa: E731
    assert {r["id"] for r in read("heldout.jsonl")}.isdisjoint({r["id"] for r in read("rmval.jsonl")})
    assert "--smoke run checks that every stage runs" in (out / "report.md").read_text()
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
        suffix = f"-{sysm['reward_model']}" if name == "edit_token" else ""
        assert run["name"] == f"{name}-kl{sysm['kl_coef']:g}{suffix}-s0"
        assert (out / "ppo" / run["name"] / "final" / "finegrain.json").exists()
        assert (out / "eval" / "winrate" / f"{run['name']}.json").exists()
    for rm in m["rm"].values():
        assert 0.0 <= rm["accuracy"] <= 1.0
    assert m["rm"]["token_edit"]["token_auroc_source"] == "gold_spans"
    assert m["systems"]["edit_token"]["reward_model"] == "token_mean_label"
    for key in ("response_auroc", "span_f1", "better_flagged_rate", "val_accuracy", "val_response_auroc"):
        assert key in m["rm"]["token_label"], key
    # the SFT policy must have something to fix, and the record says how much
    assert m["samples"]["sft_samples"]["flaw_rate"] > 0.05
    assert abs(m["annotate"]["observed_disagreement"] - m["config"]["noise"]) < 0.15
    assert m["edit"]["min_gold_gain"] > 0
    # every line of every edited pair file carries gold spans of its rejected response
    edits = [json.loads(x) for x in (out / "data" / "edits.jsonl").read_text().splitlines()]
    assert edits and all("gold_spans" in e and e["edited"] != e["rejected"] for e in edits)


@pytest.mark.slow
def test_demo_resumes_and_report_escapes(quick_run, capsys):
    import torch

    from finegrain.sandbox.report import html_report

    threads = torch.get_num_threads()
    assert main(["demo", "--smoke", "--out", str(quick_run), "--seed", "0", "--threads", str(threads + 1)]) == 0
    assert torch.get_num_threads() == threads  # the demo's own thread count ends with it
    err = capsys.readouterr().err
    m = json.loads((quick_run / "metrics.json").read_text())
    token_run = m["systems"]["edit_token"]["runs"][0]["name"]
    assert "sft: reusing" in err and f"ppo_{token_run}: reusing" in err and ": running" not in err
    m["example"] = {"prompt": "<script>alert(1)</script>", "outputs": {"sft": {"text": "a & b <i>", "gold": 0.0}}}
    page = html_report(m, ["ppo_kl.png"], None)
    assert "<script>" not in page and "&lt;script&gt;" in page and "a &amp; b &lt;i&gt;" in page
    assert "<script" not in (quick_run / "report.html").read_text()


def test_demo_bad_options_exit_2(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--noise", "0.7"]) == 2
    assert "--noise" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path), "--n-eval-prompts", "500"]) == 2
    assert main(["demo", "--out", str(tmp_path), "--sweep", "--n-eval-prompts", "432"]) == 2
    assert "--n-eval-prompts" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path), "--edit-seq-kl-coef", "-1"]) == 2
    assert main(["demo", "--out", str(tmp_path), "--quick", "--smoke"]) == 2
    assert "at most one of --quick and --smoke" in capsys.readouterr().err
    for flag in ("--n-eval-prompts", "--n-val-prompts"):  # one comparison has no standard error
        assert main(["demo", "--out", str(tmp_path), "--smoke", flag, "1"]) == 2
        assert f"{flag} must be at least 2" in capsys.readouterr().err
    # PPO splits each step's rollouts into 2 minibatches: said before any stage runs, not at the PPO stage
    assert main(["demo", "--out", str(tmp_path / "odd"), "--smoke", "--ppo-batch-size", "7"]) == 2
    assert "--ppo-batch-size must be even" in capsys.readouterr().err and not (tmp_path / "odd" / "data").exists()


def test_stages_rerun_after_an_interruption_and_follow_the_evaluation_options(tmp_path):
    """A stage re-run with other options that is interrupted is not complete for the old options either;
    the evaluation stages' keys hold the sampling options of the outputs they judge."""
    from finegrain.config import build_config
    from finegrain.sandbox.config import DemoConfig
    from finegrain.sandbox.demo import Stages, _keys

    st, calls = Stages(tmp_path), []
    assert st.run("s", {"k": 1}, lambda: calls.append(1) or {"r": 1}) == {"r": 1}
    assert st.run("s", {"k": 1}, lambda: calls.append(2) or {"r": 2}) == {"r": 1} and calls == [1]  # reused

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        st.run("s", {"k": 2}, interrupted)
    assert st.run("s", {"k": 1}, lambda: calls.append(3) or {"r": 3}) == {"r": 3} and calls == [1, 3]
    base = _keys(build_config(DemoConfig, {"out": "x", "smoke": True}))
    for option in ({"eval_temperature": 1.0}, {"max_new_tokens": 32}):
        other = _keys(build_config(DemoConfig, {"out": "x", "smoke": True, **option}))
        assert other["eval"] != base["eval"] and other["val"] != base["val"], option


def test_a_stage_record_that_is_no_object_is_one_error_naming_it(tmp_path):
    """A marker holding JSON that is not a stage record (edited by hand, another tool) crashed with AttributeError."""
    from finegrain.errors import InputError
    from finegrain.sandbox.demo import Stages

    (tmp_path / "stages").mkdir()
    for bad in ([1, 2], {"key": {"k": 1}}):
        (tmp_path / "stages" / "s.json").write_text(json.dumps(bad))
        with pytest.raises(InputError, match="not a stage record") as e:
            Stages(tmp_path).run("s", {"k": 1}, lambda: {"r": 1})
        assert str(tmp_path / "stages" / "s.json") in str(e.value)


@pytest.mark.slow
def test_demo_sweep_tunes_every_system_on_validation_prompts(quick_run, tmp_path, monkeypatch, capsys):
    """A shrunken sweep (2 KL values, 2 PPO steps) on a copy of the quick run: same grid and rule for all systems."""
    import shutil

    from finegrain.sandbox import demo

    monkeypatch.setattr(demo, "KL_GRID", (0.2, 0.5))
    monkeypatch.setattr(demo, "TOKEN_EXTRA", [("token_edit", 0.2, "raw")])
    out = tmp_path / "run"
    shutil.copytree(quick_run, out)
    assert main(["demo", "--smoke", "--out", str(out), "--sweep", "--ppo-steps", "2", "--n-val-prompts", "40",
                 "--baseline-kl-coef", "0.2", "--edit-seq-kl-coef", "0.2", "--token-kl-coef", "0.5"]) == 0
    err = capsys.readouterr().err
    assert "sft: reusing" in err and "rm_token_edit: reusing" in err
    m = json.loads((out / "metrics.json").read_text())
    sw = m["sweep"]
    assert sorted((r["system"], r["kl_coef"]) for r in sw["rows"] if r["grid"]) == sorted(
        (k, kl) for k in ("baseline", "edit_seq", "edit_token") for kl in (0.2, 0.5))
    assert [(r["kl_coef"], r["scale"]) for r in sw["rows"] if not r["grid"]] == [(0.2, "raw")]
    assert sw["best_kl"] == demo.select_best(sw["rows"]) and sw["val_passes"] == 1 and sw["n_val_prompts"] == 40
    # the validation prompts are not evaluation prompts
    val = {json.loads(x)["prompt"] for x in (out / "eval" / "val_prompts.jsonl").read_text().splitlines()}
    ev = {json.loads(x)["prompt"] for x in (out / "eval" / "prompts.jsonl").read_text().splitlines()}
    assert len(val) == 40 and not val & ev
    # a sweep point equal to a system's main setting is the main run's seed 0, run once
    assert err.count("ppo_baseline-kl0.2-s0: running") == 1 and "ppo_edit_token-kl0.5-token_mean_label-s0: reusing" in err
    report = (out / "report.md").read_text()
    assert "Sweep (PPO seed 0; validation prompts" in report and "| picked |" in report
    assert "--sweep --edit-seq-kl-coef 0.2" in report and "--token-kl-coef" not in report  # 0.5 is the default


def test_select_best_rule_exact():
    from finegrain.sandbox.demo import select_best

    def row(system, kl, wr, grid=True):
        return {"system": system, "kl_coef": kl, "val_win_rate": wr, "grid": grid}

    rows = [row("a", 0.5, 0.6), row("a", 0.05, 0.6), row("a", 0.2, 0.55), row("b", 0.05, 0.4), row("b", 1.0, 0.45),
            row("b", 0.2, 0.9, grid=False)]  # outside the grid: never picked, however good
    assert select_best(rows) == {"a": 0.05, "b": 1.0}  # a: tie 0.6 -> the smaller KL


def test_sweep_points_share_one_grid_and_names_are_settings():
    from finegrain.config import build_config
    from finegrain.sandbox.config import DemoConfig
    from finegrain.sandbox.demo import KL_GRID, run_name, sweep_points, validation_prompts
    from finegrain.sandbox.domain import make_prompts

    cfg = build_config(DemoConfig, {"out": "x", "sweep": True})
    pts = sweep_points(cfg)
    for system in ("baseline", "edit_seq", "edit_token"):
        assert tuple(kl for s, _, kl, _, grid in pts if s == system and grid) == KL_GRID
    assert len({p[:4] for p in pts}) == len(pts)
    assert run_name("baseline", "seq_pref", 0.5, "mean", 2) == "baseline-kl0.5-s2"
    assert run_name("edit_token", "token_mean", 0.05, "raw", 0) == "edit_token-kl0.05-raw-token_mean-s0"
    assert run_name("edit_token", "token_label", 1.0, "mean", 1) == "edit_token-kl1-token_label-s1"
    assert run_name("edit_token", "token_label", 1.0, "prefix", 1, 8.0) == "edit_token-kl1-prefix-token_label-seq8-s1"
    assert run_name("edit_seq", "seq_edit", 2.0, "mean", 0, 8.0) == "edit_seq-kl2-s0"  # token runs only
    # full preset: 300 of the 432 sandbox prompts evaluate, the other 132 validate, 3 samples each (>= 300)
    eval_prompts = make_prompts(300, 4, unique=True)
    val, passes = validation_prompts(cfg, eval_prompts)
    assert len(val) == 132 == len(set(val)) and not set(val) & set(eval_prompts) and passes == 3


def test_difference_line_uses_the_larger_se_exact():
    from finegrain.sandbox.report import difference_line

    s = {"edit_token": {"win_rate": 0.61, "win_rate_se": 0.003, "win_rate_judge_se": 0.016, "gold_reward": 1.2,
                        "gold_reward_se": 0.03},
         "edit_seq": {"win_rate": 0.58, "win_rate_se": 0.012, "win_rate_judge_se": 0.012, "gold_reward": 0.9,
                      "gold_reward_se": 0.04}}
    line = difference_line(s, "edit_seq")
    # win rate: sqrt(0.016^2 + 0.012^2) = 0.020 -> +3.0 +- 2.0, within 2 SE; gold: +0.300 +- 0.050, beyond
    assert "win rate +3.0 points (± 2.0" in line and "within two standard errors: not a clear" in line
    assert "gold reward +0.300 (± 0.050" in line and line.endswith("beyond two standard errors.")


def test_table_1_gives_each_win_rate_the_se_its_differences_use(quick_run):
    """Table 1 quoted the SE over PPO seeds (61.0 ± 0.3), blind to the judge's noise (± 1.6) that the
    difference lines count: each row now gives the larger, as they do."""
    from finegrain.sandbox.report import tables, win_rate_se

    m = json.loads((quick_run / "metrics.json").read_text())
    k = "edit_token"
    m["systems"][k].update(win_rate=0.61, win_rate_se=0.003, win_rate_judge_se=0.016)
    assert win_rate_se(m["systems"][k]) == 0.016
    title, header, rows = tables(m)[0]
    assert title.startswith("Table 1") and "the larger of seed and judge SE" in header[2]
    assert [r[2] for r in rows if r[0] == m["systems"][k]["label"]] == ["61.0 ± 1.6"]


def test_tuning_findings_say_whether_systems_are_equally_tuned():
    from finegrain.sandbox.report import tuning_findings

    rows = [{"system": k, "kl_coef": kl, "val_win_rate": wr, "val_se": 0.03, "grid": True}
            for k, kl, wr in (("baseline", 0.2, 0.5), ("baseline", 0.5, 0.6), ("edit_token", 0.2, 0.7),
                              ("edit_token", 0.5, 0.6))]
    sw = {"rows": rows, "best_kl": {"baseline": 0.5, "edit_token": 0.2}, "grid": [0.2, 0.5], "rule": "best val",
          "n_val_prompts": 10, "val_passes": 1}
    m = {"systems": {"baseline": {"kl_coef": 0.5}, "edit_token": {"kl_coef": 0.2}}, "sweep": sw}
    text = " ".join(tuning_findings(m))
    assert "baseline 0.5 (60.0%)" in text and "each system at its own pick" in text
    assert "The pick of baseline is the largest KL" in text
    assert "baseline +10.0 ± 4.2 over KL 0.2" in text and "edit_token +10.0 ± 4.2 over KL 0.5" in text
    m["systems"]["edit_token"]["kl_coef"] = 0.5
    assert "NOT every system at its pick" in " ".join(tuning_findings(m))


def test_report_says_the_kl_coefficients_are_the_defaults_only_when_they_are():
    from finegrain.sandbox.config import DemoConfig
    from finegrain.sandbox.report import settings_line, tuning_findings

    d = DemoConfig()
    cfg = {"ppo_lr": 3e-4, "baseline_kl_coef": d.baseline_kl_coef, "edit_seq_kl_coef": d.edit_seq_kl_coef,
           "token_kl_coef": d.token_kl_coef, "token_reward_scale": "mean", "token_rm": "token_mean_label"}
    sizes = {"ppo_steps": 2, "ppo_batch_size": 4, "ppo_seeds": 1}
    systems = {k: {"kl_coef": cfg[f"{k}_kl_coef" if k != "edit_token" else "token_kl_coef"]}
               for k in ("baseline", "edit_seq", "edit_token")}
    m = {"config": cfg, "sizes": sizes, "systems": systems}
    assert "the demo defaults" in settings_line(m) and "the demo defaults" in tuning_findings(m)[0]
    # a run at other KL coefficients (e.g. the re-run sweep's picks) must not be called the defaults, nor the
    # defaults "the pick of the sweep" of a run whose own sweep picked otherwise
    m["config"] = dict(cfg, baseline_kl_coef=0.5)
    m["systems"]["baseline"]["kl_coef"] = 0.5
    assert "defaults:" not in settings_line(m) and "not all the demo defaults" in settings_line(m)
    assert "not all the demo defaults" in tuning_findings(m)[0]
    assert "pick of the sweep" not in settings_line(dict(m, config=cfg))


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


@pytest.mark.slow  # quick_run runs `demo --smoke`, like the other tests that use it
def test_rm_finding_says_whether_the_gap_is_beyond_noise(quick_run):
    from finegrain.sandbox.report import findings

    m = json.loads((quick_run / "metrics.json").read_text())

    def rm_line(seq, tok, se):
        m["rm"]["seq_pref"].update(accuracy=seq, accuracy_se=se)
        m["rm"][m["systems"]["edit_token"]["reward_model"]].update(accuracy=tok, accuracy_se=se)
        return next(x for x in findings(m) if x.startswith("RM accuracy"))

    # gap 2.3 points, SE of the gap sqrt(2) * 2.4 = 3.4: within two SEs
    assert "(+2.3 ± 3.4 points: within two standard errors" in rm_line(0.627, 0.650, 0.024)
    assert "(+10.2 ± 3.4 points: beyond two standard errors)" in rm_line(0.623, 0.725, 0.024)
    assert "NOT more accurate" in rm_line(0.70, 0.65, 0.024)


def test_select_token_rm_rule_exact():
    from finegrain.sandbox.demo import select_token_rm

    def rm(kind, acc, se, auc):
        return {"kind": kind, "val_accuracy": acc, "val_accuracy_se": se, "val_response_auroc": auc}

    rms = {"seq_pref": rm("sequence", 0.99, 0.01, None),      # sequence RMs are never the token system's RM
           "token_edit": rm("token", 0.74, 0.02, 0.60), "token_label": rm("token", 0.72, 0.02, 0.85),
           "token_mean": rm("token", 0.70, 0.02, 0.95)}
    # best accuracy 0.74; within one SE (>= 0.72): token_edit, token_label -> the higher AUROC
    assert select_token_rm(rms) == "token_label"
    rms["token_label"]["val_accuracy"] = 0.71
    assert select_token_rm(rms) == "token_edit"
    assert select_token_rm({"seq_pref": rms["seq_pref"]}) is None


@pytest.mark.slow
def test_newcomer_preset_raises_the_gold_reward_of_every_system(tmp_path):
    """The README's first command: PPO must raise the gold reward of every system (the issue's bar: the last
    PPO step above the first), and the report must draw its conclusions from the numbers."""
    out = tmp_path / "quick"
    assert main(["demo", "--quick", "--out", str(out), "--seed", "0"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    for name, sysm in m["systems"].items():
        gold = sysm["runs"][0]["ppo"]["curve"]["gold_reward"]
        assert len(gold) == m["sizes"]["ppo_steps"]
        assert gold[-1] > gold[0], f"{name}: gold reward {gold[0]:.3f} at step 1, {gold[-1]:.3f} at the last step"
        assert sysm["gold_reward"] > m["eval_sft"]["gold"]["gold_reward"], name   # held-out prompts too
    assert "Win-rate order measured" in (out / "report.md").read_text()


def test_pooled_win_rate_over_passes_on_the_same_prompts_exact():
    """Three prompts, two passes: per-prompt means 0.75, 0.5, 0 (an unjudged comparison left out),
    mean 5/12, SE = sd(0.75, 0.5, 0) / sqrt(3) = sqrt(7/48) / sqrt(3); the passes' SEs combined as
    independent would give another (smaller) figure."""
    from finegrain.sandbox.demo import pooled_win_rate

    got = pooled_win_rate([[1.0, 0.5, 0.0], [0.5, None, 0.0]])
    assert got["n_prompts"] == 3 and got["win_rate"] == pytest.approx(5 / 12)
    assert got["se"] == pytest.approx(math.sqrt(7 / 48) / math.sqrt(3))


def test_the_sft_reference_samples_from_a_stream_no_ppo_run_shares():
    from finegrain.sandbox.demo import generation_seed

    for demo_seed in range(100):
        reference = {generation_seed("sft", demo_seed, j) for j in range(3)}
        runs = {generation_seed(f"run-s{k}", demo_seed * 100 + k, j) for k in range(3) for j in range(3)}
        assert not reference & runs, demo_seed
    assert generation_seed("baseline-kl0.2-s0", 0) == 10_000  # PPO runs keep their streams


def test_one_seed_aggregate_is_strict_json():
    """--quick and --smoke run one PPO seed: the gold reward's SE over seeds was NaN, written into metrics.json
    as the bare token NaN (not JSON: jq and JSON.parse refuse the file). None instead; the report shows no SE."""
    from finegrain.sandbox.demo import aggregate
    from finegrain.sandbox.report import pm

    one = aggregate([{"eval": {"win_rate": 0.6, "se": 0.03, "gold": {"gold_reward": 1.5, "flaw_rate": 0.5}}}])
    json.dumps(one, allow_nan=False)
    assert one["gold_reward_se"] is None and pm(one["gold_reward"], one["gold_reward_se"]) == "1.500"


def test_demo_out_that_is_a_file_is_one_error_line(tmp_path, capsys):
    blocker = tmp_path / "f"
    blocker.write_text("x")
    for out in (blocker, blocker / "run"):
        assert main(["demo", "--smoke", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("finegrain demo: error: ") and "--out cannot be written" in err and str(blocker) in err


def test_a_second_demo_in_the_same_out_is_refused(tmp_path, capsys):
    """Two demos in one --out delete and rewrite each other's stages: the second stops before any stage."""
    from finegrain.io import exclusive_lock

    out = tmp_path / "run"
    with exclusive_lock(out / ".lock", str(out)):
        assert main(["demo", "--smoke", "--out", str(out)]) == 2
    assert "in use by" in capsys.readouterr().err and not (out / "stages").exists()


def test_odd_n_embd_is_refused_before_any_stage_naming_a_demo_option(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["demo", "--smoke", "--out", str(out), "--n-embd", "3"]) == 2
    err = capsys.readouterr().err
    assert "--n-embd must be even" in err and "--n-head" not in err and not out.exists()


def test_a_reused_ppo_run_evaluates_the_policy_in_its_own_out(tmp_path):
    """A stage record holds the path of the directory the run was made in: after `mv runs/demo runs/old` a resume
    of runs/old (e.g. with --sweep) evaluated runs/demo's policy, whatever run is there now."""
    from finegrain.config import build_config
    from finegrain.io import write_json
    from finegrain.sandbox.config import DemoConfig
    from finegrain.sandbox.demo import Stages, _keys, ppo_run, run_key, run_name

    out = tmp_path / "moved"
    cfg = build_config(DemoConfig, {"out": str(out), "smoke": True})
    keys = _keys(cfg)
    name = run_name("baseline", "seq_pref", 0.2, "mean", 0)
    key = run_key(keys, "seq_pref", "sequence", 0.2, "mean", 0)
    write_json(out / "stages" / f"ppo_{name}.json", {"key": key, "elapsed_s": 1.0, "result": {
        "final_policy": str(tmp_path / "demo" / "ppo" / name / "final"), "wall_s": 1.0, "s_per_step": 1.0,
        "curve": {}}})
    st = Stages(out)
    got_name, _, ppo = ppo_run(cfg, out, st, keys, "baseline", "seq_pref", 0.2, "mean", 0)
    assert st.n_reused == 1 and got_name == name
    assert ppo["final_policy"] == str(out / "ppo" / name / "final")


def test_command_line_remakes_the_run():
    """The report's Command named only the preset, seed, sweeps and KL options: a run with --ppo-steps 2 --noise 0.1
    was shown as the default run's command."""
    import shlex

    from finegrain.cli import build_parser
    from finegrain.config import build_config, config_from_args, to_dict
    from finegrain.sandbox.config import DemoConfig
    from finegrain.sandbox.report import command_line

    cfg = build_config(DemoConfig, {"out": "runs/my demo", "smoke": True, "seed": 3, "sweep": True, "ppo_steps": 2,
                                    "noise": 0.1, "edit_seq_kl_coef": 0.2, "ppo_lr": 3e-5})
    cmd = command_line(to_dict(cfg))
    assert "--sweep --edit-seq-kl-coef 0.2" in cmd and "--token-kl-coef" not in cmd  # defaults stay out
    argv = shlex.split(cmd)
    assert argv[:2] == ["finegrain", "demo"]
    again = config_from_args(DemoConfig, build_parser("demo").parse_args(argv[1:]))
    assert to_dict(again) == to_dict(cfg)


def test_win_rate_order_does_not_order_equal_win_rates(quick_run):
    from finegrain.sandbox.report import findings

    m = json.loads((quick_run / "metrics.json").read_text())
    for k, wr in (("baseline", 0.55), ("edit_seq", 0.55), ("edit_token", 0.6)):
        m["systems"][k]["win_rate"] = wr
    line = next(x for x in findings(m) if x.startswith("Win-rate order"))
    assert line.startswith("Win-rate order measured: edit_token > baseline = edit_seq (paper:")
    assert "NOT the paper's order (equal win rates)." in line
    for k, wr in (("baseline", 0.5), ("edit_seq", 0.55), ("edit_token", 0.6)):
        m["systems"][k]["win_rate"] = wr
    line = next(x for x in findings(m) if x.startswith("Win-rate order"))
    assert "edit_token > edit_seq > baseline (paper" in line and line.endswith("the same order as the paper.")


def test_table_1_gives_the_kl_coefficient_as_set(quick_run):
    """KL coefficients were rounded to two decimals: --token-kl-coef 0.001 was shown as 0.00."""
    from finegrain.sandbox.report import tables

    m = json.loads((quick_run / "metrics.json").read_text())
    m["systems"]["edit_token"]["kl_coef"] = 0.001
    _, header, rows = tables(m)[0]
    assert [r[1] for r in rows if r[0] == m["systems"]["edit_token"]["label"]] == ["0.001"]


@pytest.mark.slow  # quick_run runs `demo --smoke`, like the other tests that use it
def test_token_sequence_coef_reruns_only_the_token_system_with_the_edit_sequence_rm(quick_run, tmp_path, capsys):
    """--token-sequence-coef: the token system's PPO gets seq_edit as ppo's --sequence-reward-model (a run and a
    name of its own); every other stage is reused, the other systems keep their runs, and the report says so."""
    import shutil

    from finegrain.config import build_config
    from finegrain.sandbox.config import DemoConfig
    from finegrain.sandbox.demo import ppo_config

    out = tmp_path / "run"
    shutil.copytree(quick_run, out)
    capsys.readouterr()
    assert main(["demo", "--smoke", "--out", str(out), "--seed", "0", "--token-sequence-coef", "2"]) == 0
    err = capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    name = m["systems"]["edit_token"]["runs"][0]["name"]
    assert name.endswith("-seq2-s0") and f"ppo_{name}: running" in err and "sft: reusing" in err
    assert m["systems"]["edit_token"]["label"].endswith("(edit data + token RM + seq_edit x 2 at the end)")
    assert f"ppo_{m['systems']['edit_seq']['runs'][0]['name']}: reusing" in err
    rows = [json.loads(x) for x in (out / "ppo" / name / "metrics.jsonl").read_text().splitlines()]
    assert rows and all("sequence_score" in r for r in rows)
    assert "plus seq_edit's standardised score x 2.0 at the last token" in (out / "report.md").read_text()
    assert "--token-sequence-coef 2.0" in (out / "report.md").read_text()
    cfg = build_config(DemoConfig, {"out": str(out), "token_sequence_coef": 2.0})
    seq = ppo_config(cfg, out, "seq_edit", "sequence", 0, tmp_path / "x", kl=2.0, scale="mean")
    assert seq.sequence_reward_model is None  # the sequence systems are untouched
