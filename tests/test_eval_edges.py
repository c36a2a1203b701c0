"""Edge cases of winrate (matching, leaderboard, judge answers), show-rewards' page and the trackers' options."""
from __future__ import annotations

import csv
import json
import re
from html import unescape

import pytest

from finegrain.cli import main
from finegrain.config import build_config
from finegrain.errors import ConfigError, InputError
from finegrain.eval.show import PairView, ResponseView, reward_colour, token_reward_html
from finegrain.eval.winrate import WinrateConfig, update_leaderboard, winrate
from finegrain.llm.backends import JudgeResult, register_backend


class MarkerJudge:
    """A local judge: prefers the output holding "GOOD"; ``PREFERENCE=x;`` in an output forces raw preference x."""

    name = "edges-judge"
    prompt_version = "v1"
    remote = False
    calls = 0

    def __init__(self, model: str):
        self.model = model

    async def judge(self, req):
        MarkerJudge.calls += 1
        forced = re.search(r"PREFERENCE=([^;]*);", req.output_1 + req.output_2)
        if forced:
            return JudgeResult(float(forced.group(1)), raw=forced.group(0))
        a, b = "GOOD" in req.output_1, "GOOD" in req.output_2
        return JudgeResult(1.0 if a and not b else 2.0 if b and not a else 1.5, raw="x", input_tokens=3,
                           output_tokens=1)


register_backend("edges-judge", judge=MarkerJudge)


def write(path, rows):
    path.write_text(json.dumps(rows))
    return str(path)


def cfg_of(tmp_path, outputs, reference, **kw):
    return build_config(WinrateConfig, dict(outputs=outputs, reference=reference, judge="edges-judge",
                                            judge_model="m", output=str(tmp_path / "w" / "r.json"), **kw))


def test_outputs_with_a_prompt_field_match_their_reference_by_instruction(tmp_path):
    # generate keeps the input records' fields: a prompts file with a templated `prompt` and the AlpacaEval
    # `instruction` gives outputs with both; AlpacaEval (and the docs) match by instruction
    outs = write(tmp_path / "o.json", [{"instruction": f"Task {i}", "prompt": f"<|user|>Task {i}<|assistant|>",
                                        "output": "GOOD" if i else "x", "generator": "m"} for i in range(3)])
    refs = write(tmp_path / "r.json", [{"instruction": f"Task {i}", "output": "ref"} for i in range(3)])
    res = winrate(cfg_of(tmp_path, outs, refs))
    assert (res["n"], res["n_wins"], res["n_draws"]) == (3, 2, 1)
    ann = json.loads((tmp_path / "w" / "r.annotations.json").read_text())
    assert [a["instruction"] for a in ann] == ["Task 0", "Task 1", "Task 2"]  # what the judge saw


def test_conflicting_duplicate_references_are_an_error(tmp_path):
    outs = write(tmp_path / "o.json", [{"instruction": "Task", "output": "GOOD"}])
    same = write(tmp_path / "same.json", [{"instruction": "Task", "output": "ref"}] * 2)
    assert winrate(cfg_of(tmp_path, outs, same))["n"] == 1  # the same reference twice: harmless
    refs = write(tmp_path / "r.json", [{"instruction": "Task", "output": "ref GOOD"},
                                       {"instruction": "Task", "output": "another ref"}])
    with pytest.raises(InputError, match=r"r\.json: index 1: field 'instruction': .*index 0"):
        winrate(cfg_of(tmp_path, outs, refs))


def test_preferences_outside_1_to_2_are_failed_judgements_not_scores(tmp_path):
    outs = write(tmp_path / "o.json", [{"instruction": f"T{i}", "output": o} for i, o in
                                       enumerate(["GOOD", "PREFERENCE=0;", "PREFERENCE=3;", "PREFERENCE=nan;"])])
    refs = write(tmp_path / "r.json", [{"instruction": f"T{i}", "output": "ref"} for i in range(4)])
    res = winrate(cfg_of(tmp_path, outs, refs))
    assert (res["n"], res["n_failed"], res["win_rate"]) == (1, 3, 1.0)
    ann = json.loads((tmp_path / "w" / "r.annotations.json").read_text())
    assert [a["preference"] for a in ann] == [2.0, None, None, None]
    assert all("preference" in a["error"] for a in ann[1:])


def test_leaderboard_saved_by_a_spreadsheet_keeps_its_names_and_columns(tmp_path):
    # a UTF-8 BOM (Excel's "CSV UTF-8") and a column of the user's own
    p = tmp_path / "lb.csv"
    p.write_bytes("\ufeffname,win_rate,standard_error,n_wins,n_draws,n_total,avg_length,notes\n"
                  "sft,40.0,2.0,4,0,10,100,baseline run\n".encode("utf-8"))
    row = dict(name="ppo", win_rate=60.0, standard_error=1.0, n_wins=6, n_draws=0, n_total=10, avg_length=120)
    rows = update_leaderboard(str(p), row)
    assert [(r["name"], float(r["win_rate"])) for r in rows] == [("ppo", 60.0), ("sft", 40.0)]
    with open(p, newline="", encoding="utf-8") as f:
        back = list(csv.DictReader(f))
    assert [r["name"] for r in back] == ["ppo", "sft"] and back[1]["notes"] == "baseline run"


def test_a_bad_leaderboard_stops_before_judging_and_writing(tmp_path, capsys):
    outs = write(tmp_path / "o.json", [{"instruction": "Task", "output": "GOOD"}])
    refs = write(tmp_path / "r.json", [{"instruction": "Task", "output": "ref"}])
    lb = tmp_path / "lb.csv"
    lb.write_text("name,win_rate\nsft,40.0\nppo,about half\n")
    before, calls = lb.read_text(), MarkerJudge.calls
    code = main(["winrate", "--outputs", outs, "--reference", refs, "--judge", "edges-judge", "--judge-model", "m",
                 "--output", str(tmp_path / "w" / "r.json"), "--leaderboard", str(lb)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "lb.csv: line 3: field 'win_rate'" in err and "\n" not in err, err
    assert MarkerJudge.calls == calls and lb.read_text() == before and not (tmp_path / "w").exists()
    # a CSV that is not a leaderboard (no name column) is refused, not rewritten without its names
    lb.write_text(",win_rate,mode\ngpt4,80.0,verified\n")
    with pytest.raises(InputError, match="no 'name' column"):
        update_leaderboard(str(lb), dict(name="x", win_rate=1.0, standard_error=None, n_wins=0, n_draws=0,
                                         n_total=1, avg_length=1))
    assert "gpt4" in lb.read_text()


def test_outputs_of_a_ppo_runs_final_policy_are_named_after_the_run():
    # ppo saves every run's policy as OUTPUT/final: named "final", two runs would share one leaderboard row
    from finegrain.eval.generate import default_generator

    assert default_generator("runs/ppo-token/final") == "ppo-token"
    assert default_generator("runs/ppo-seq/final/") == "ppo-seq"
    assert default_generator("runs/sft") == "sft" and default_generator("org/Model-7B") == "Model-7B"


# ------------------------------------------------------------------------------------------------ show-rewards
def visible(page: str) -> str:
    """The text a browser shows in the responses."""
    body = "".join(re.findall(r'<div class="resp">(.*?)</div>', page, re.DOTALL))
    return unescape(re.sub(r"<[^>]+>", "", body))


def test_byte_level_pieces_of_one_character_show_it_once():
    # byte-level BPE splits an emoji into 4 pieces and a Hebrew letter into 2, each with the character's offsets
    text = "a 😀 שָׁ b"
    enc = [(0, 1), (2, 2), (2, 3), (2, 3), (2, 3), (2, 3), (4, 4), (4, 5), (4, 5), (5, 6), (5, 6), (6, 7), (6, 7),
           (8, 8), (8, 9)]
    offsets = enc + [(len(text), len(text))]
    tokens = ["?"] * len(enc) + ["<|eos|>"]
    view = ResponseView("r", text, tokens, offsets, [0.1 * k for k in range(len(offsets))])
    page = token_reward_html([PairView("x", "p", [view])])
    assert visible(page) == text + "<|eos|>"
    assert page.count('title="reward ') == len(offsets)  # every piece keeps its reward


def test_a_trailing_space_token_is_not_shown_as_the_closing_token():
    # a trimmed trailing space has offsets (len, len) like the closing EOS, which is always the last position
    text = "ok "
    view = ResponseView("r", text, ["ok", "Ġ", "<|eos|>"], [(0, 2), (3, 3), (3, 3)], [0.0, 1.0, 2.0])
    page = token_reward_html([PairView("x", "p", [view])])
    assert visible(page) == "ok <|eos|>" and "Ġ" not in page
    assert page.count('class="tok special"') == 1 and page.count('class="tok zw"') == 1


def test_long_tokens_wrap_and_whitespace_tokens_keep_their_text():
    long = "x" * 5000
    text = f"{long}\n\n  y"
    offsets = [(0, 5000), (5000, 5002), (5002, 5004), (5004, 5005), (5005, 5005)]
    view = ResponseView("r", text, [text[a:b] for a, b in offsets[:-1]] + ["</s>"], offsets, [0.0, 1.0, 2.0, 3.0, 4.0])
    page = token_reward_html([PairView("x", "p", [view])])
    assert visible(page) == text + "</s>"
    css = re.search(r"<style>(.*)</style>", page, re.DOTALL).group(1)
    for cls in (".resp", ".prompt"):
        rule = re.search(re.escape(cls) + r"\{([^}]*)\}", css).group(1)
        assert "overflow-wrap:anywhere" in rule, cls  # a 5,000-character token stays inside its box


def test_colours_stay_sane_with_a_non_finite_centre_or_overflowing_gaps():
    view = ResponseView("r", "ab", ["a", "b", "e"], [(0, 1), (1, 2), (2, 2)], [-1.0, 1.0, 0.0])
    for centre in (float("nan"), float("inf")):
        page = token_reward_html([PairView("x", "p", [view])], centre=centre)
        assert not re.search(r"[+-](nan|inf)", page)  # no NaN or infinite centre in the legend
        assert "centre +0.000 (the median reward on this page)" in page
        for r in (-1.0, 1.0):  # full red and full blue at -+1, as without a centre
            assert f'background:{reward_colour(r, 0.0, 1.0)}" title="reward {r:+.4f}"' in page
    # a reward gap that overflows to inf is a full end colour, not a NaN read as full blue
    assert reward_colour(-1e308, 1e308, float("inf")) == reward_colour(-1e308, 1e308, 1.0) == "rgb(221,79,71)"


# ------------------------------------------------------------------------------------------------ trackers
def test_log_with_names_a_missing_tracker_or_carries_spaces():
    import importlib.util

    from finegrain.tracking import resolve_log_with

    assert resolve_log_with(" none ") == [] and resolve_log_with("none") == []
    assert resolve_log_with(" auto") == resolve_log_with("auto")
    assert resolve_log_with("all") == ["all"]  # accelerate's every installed tracker: nothing to be missing
    if importlib.util.find_spec("tensorboard") is not None:
        assert resolve_log_with(" tensorboard ") == ["tensorboard"]
    if importlib.util.find_spec("wandb") is None:  # asked for by name: an error, not a silent run without it
        with pytest.raises(ConfigError, match="wandb.*not installed.*pip install wandb"):
            resolve_log_with("tensorboard,wandb")


def test_progress_bar_is_off_when_stderr_is_not_a_terminal(monkeypatch, capsys):
    from finegrain.tracking import progress

    monkeypatch.delenv("FINEGRAIN_PROGRESS", raising=False)
    bar = progress(total=3, desc="x")  # pytest captures stderr: not a terminal
    assert bar.disable
    bar.close()
    monkeypatch.setenv("FINEGRAIN_PROGRESS", "1")
    bar = progress(total=3, desc="x")
    assert not bar.disable
    bar.close()
    capsys.readouterr()


def test_a_resumed_run_shows_each_step_once_in_tensorboard(tmp_path):
    """Steps an interrupted run logged after its last checkpoint are logged again by the resumed run: TensorBoard
    hides the earlier ones (purge_step), as metrics.jsonl drops them."""
    pytest.importorskip("tensorboard")
    from accelerate import Accelerator
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from finegrain.tracking import init_trackers

    for first, last, offset in ((1, 5, 0.0), (3, 6, 100.0)):  # killed after step 5; resumed from step 2's checkpoint
        acc = Accelerator(log_with="tensorboard", project_dir=str(tmp_path))
        init_trackers(acc, "ppo", {"lr": 1e-3}, first_step=first)
        for step in range(first, last + 1):
            acc.log({"loss": offset + step}, step=step)
        acc.end_training()
    ea = EventAccumulator(str(tmp_path / "ppo"))
    ea.Reload()
    assert [(e.step, e.value) for e in ea.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 103.0), (4, 104.0),
                                                               (5, 105.0), (6, 106.0)]
