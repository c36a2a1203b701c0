"""show-rewards: the HTML heat map (escaping, U1 outlines, colours) and the command."""
from __future__ import annotations

import re
from html import unescape

import pytest

from finegrain.cli import main
from finegrain.eval.show import PairView, ResponseView, reward_colour, token_reward_html
from finegrain.io import write_jsonl
from test_rm_train import make_base_model, synthetic_pairs

pytestmark = pytest.mark.usefixtures("single_thread")  # one torch thread: tiny models


def test_html_escapes_text_and_marks_changed_tokens():
    text = "<script>alert(1)</script> & ok"
    offsets = [(0, 8), (8, 16), (16, 25), (26, 27), (28, 30), (30, 30)]
    view = ResponseView("worse <b>", text, [text[a:b] for a, b in offsets[:-1]] + ["<|eos|>"], offsets,
                        [-2.0, -1.0, 0.0, 0.5, 1.0, 0.2], changed=[False, True, False, False, False, False],
                        gold=[True, False, False, False, False, False], score=-0.05)
    page = token_reward_html([PairView("id<1>", "prompt \"<i>\"", [view])], title="t<x>")
    assert "<script>" not in page and "&lt;script&gt;" in page and ">&amp;</span>" in page
    assert "id&lt;1&gt;" in page and "prompt &quot;&lt;i&gt;&quot;" in page and "worse &lt;b&gt;" in page
    assert "&lt;|eos|&gt;" in page and "t&lt;x&gt;" in page
    assert page.count('class="tok u1"') == 1 and page.count('class="tok gold"') == 1
    assert 'title="reward -2.0000"' in page and "score -0.0500" in page
    # diverging around the centre: full (85 %) red at centre - scale, half blue at centre + scale / 2, white at it
    assert reward_colour(-2.0, 0.0, 2.0) == "rgb(221,79,71)" and reward_colour(1.0, 0.0, 2.0) == "rgb(176,196,223)"
    assert reward_colour(3.0, 3.0, 1.0) == "rgb(255,255,255)" and reward_colour(-9.0, 0.0, 1.0) == "rgb(221,79,71)"
    assert reward_colour(0.0, 0.0, 0.0) == "rgb(255,255,255)" and reward_colour(float("nan"), 0.0, 1.0) == "rgb(255,255,255)"
    # no centre given: the page's median reward (0.2 here), stated in the legend
    assert "centre +0.200 (the median reward on this page)" in page


def test_colour_scale_is_the_95th_percentile_gap_and_the_legend_names_the_centre():
    from finegrain.eval.show import colour_scale

    rewards = [float(k) for k in range(20)] + [1000.0]          # one extreme token
    assert colour_scale(rewards, 0.0) == 19.0                    # 95th percentile of |r - 0| over 21 values
    view = ResponseView("worse", "ab", ["a", "b"], [(0, 1), (1, 2)], [-1.0, 3.0])
    page = token_reward_html([PairView("x", "p", [view])], centre=1.0, centre_label="the flaw threshold")
    assert "centre +1.000 (the flaw threshold)" in page and "+1.00</span>" in page


def test_show_rewards_command(tmp_path, capsys):
    rows = synthetic_pairs(12, seed=1)
    rows[0]["rejected"] = "The <b>cat</b> is awful & odd."
    rows[0]["gold_spans"] = [[rows[0]["rejected"].index("awful"), rows[0]["rejected"].index("awful") + 5]]
    rows[0]["edited"] = "The <b>cat</b> is lovely & odd."
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    base = make_base_model(tmp_path / "base")
    for loss in ("token_edit", "sequence"):
        assert main(["train-rm", "--data", str(tmp_path / "pairs.jsonl"), "--model", str(base), "--loss", loss,
                     "--output", str(tmp_path / loss), "--epochs", "0.5", "--eval-fraction", "0",
                     "--log-with", "none", "--max-length", "48"]) == 0
    page = tmp_path / "page.html"
    assert main(["show-rewards", "--model", str(tmp_path / "token_edit"), "--data", str(tmp_path / "pairs.jsonl"),
                 "--output", str(page), "--n", "3"]) == 0
    html = page.read_text()
    assert html.count('<div class="pair">') == 3 and "<b>" not in html
    visible = unescape(re.sub(r"<[^>]+>", "", html))   # the text a browser shows
    assert rows[0]["rejected"] in visible and rows[0]["edited"] in visible
    # (the CSS and the legend name the classes too: look for them on token spans)
    assert 'class="tok u1' in html and re.search(r'class="tok[^"]* gold', html) and html.count("<h3>") == 6
    # the centre is the RM's own flaw threshold, named in the legend
    assert "(the flaw threshold train-rm chose on its training pairs)" in html
    assert main(["show-rewards", "--model", str(tmp_path / "token_edit"), "--data", str(tmp_path / "pairs.jsonl"),
                 "--output", str(page), "--n", "3", "--no-mark-changed"]) == 0
    assert 'class="tok u1' not in page.read_text()
    capsys.readouterr()
    assert main(["show-rewards", "--model", str(tmp_path / "sequence"), "--data", str(tmp_path / "pairs.jsonl"),
                 "--output", str(page)]) == 2
    err = capsys.readouterr().err
    assert "needs a token reward model" in err
    from finegrain.rm.losses import loss_names  # every token loss is named, not two of them

    assert f"(train one with --loss {', '.join(loss_names(kind='token'))})" in err and "token_label" in err, err
