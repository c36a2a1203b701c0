"""eval-rm: AUROC, the RewardModel API, and the train-rm -> eval-rm command line end to end."""
from __future__ import annotations

import json
from itertools import product
from pathlib import Path

import pytest
import torch
from hypothesis import given, strategies as st

from finegrain.cli import main
from finegrain.io import write_jsonl
from finegrain.rm import RewardModel, auroc
from test_rm_train import make_base_model, synthetic_pairs

pytestmark = pytest.mark.usefixtures("single_thread")  # one torch thread: tiny models


def test_auroc_hand_computed():
    # positives 0.35, 0.8 vs negatives 0.1, 0.4: 3 of 4 (pos, neg) pairs ordered right
    assert auroc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == 0.75
    # a tie counts one half: pos 1 vs negs (1, 2) -> (0.5 + 0) / 2
    assert auroc([1.0, 1.0, 2.0], [True, False, False]) == 0.25
    assert auroc([3.0, 3.0, 3.0], [True, False, True]) == 0.5
    assert auroc([1.0, 2.0], [True, True]) is None and auroc([], []) is None


@given(st.lists(st.tuples(st.integers(-3, 3), st.booleans()), min_size=1, max_size=40))
def test_auroc_equals_pairwise_count(rows):
    scores, labels = [float(s) for s, _ in rows], [y for _, y in rows]
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    got = auroc(scores, labels)
    if not pos or not neg:
        assert got is None
        return
    want = sum((p > n) + 0.5 * (p == n) for p, n in product(pos, neg)) / (len(pos) * len(neg))
    assert got == pytest.approx(want)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("evaldata")
    write_jsonl(d / "train.jsonl", synthetic_pairs(32, seed=1))
    write_jsonl(d / "heldout.jsonl", synthetic_pairs(16, seed=2, prefix="h"))
    write_jsonl(d / "nogold.jsonl", [{k: v for k, v in r.items() if k != "gold_spans"}
                                     for r in synthetic_pairs(16, seed=2, prefix="h")])
    make_base_model(d / "base")
    return d


def cli(*argv: str) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def trained(files) -> Path:
    out = files / "rm"
    code = cli("train-rm", "--data", files / "train.jsonl", "--model", files / "base", "--loss", "token_edit",
               "--pairs", "edit", "--output", out, "--epochs", 4, "--lr", 3e-3, "--batch-size", 8,
               "--max-length", 48, "--eval-fraction", 0.0, "--log-with", "tensorboard", "--save-every", 0,
               "--dtype", "auto")  # a float32 base: float32
    assert code == 0
    return out


def test_cli_train_then_eval(trained, files, tmp_path, capsys):
    assert (trained / "finegrain.json").exists() and (trained / "metrics.jsonl").exists()
    assert any(trained.rglob("events.out.tfevents*"))   # TensorBoard through accelerate
    out = tmp_path / "res.json"
    capsys.readouterr()
    assert cli("eval-rm", "--model", trained, "--data", files / "heldout.jsonl", "--pairs", "edit",
               "--output", out) == 0
    res = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == res   # the same JSON on stdout
    assert {"accuracy", "accuracy_se", "n_pairs", "token_auroc", "token_auroc_source", "ties",
            "mean_margin"} <= set(res)
    assert res["n_pairs"] == 16 and res["token_auroc_source"] == "gold_spans"
    assert res["accuracy_se"] == pytest.approx((res["accuracy"] * (1 - res["accuracy"]) / 16) ** 0.5)
    print(f"CLI token RM: accuracy={res['accuracy']:.3f} token_auroc={res['token_auroc']:.3f}")
    assert res["accuracy"] >= 0.8
    # the threshold comes from train-rm's own pairs (no held-out split here), and eval-rm says so
    assert res["flaw_threshold"] == json.loads((trained / "finegrain.json").read_text())["flaw_threshold"]
    assert res["flaw_threshold_from"] == "train-rm's training pairs"
    # without gold spans, edit pairs use the changed (U1) tokens of the rejected side (--dtype auto: the float32
    # the RM was saved in, the same scores)
    assert cli("eval-rm", "--model", trained, "--data", files / "nogold.jsonl", "--pairs", "edit",
               "--output", out, "--dtype", "auto") == 0
    res2 = json.loads(out.read_text())
    assert res2["token_auroc_source"] == "edit_u1" and res2["accuracy"] == res["accuracy"]
    # preference pairs without gold spans: accuracy only
    assert cli("eval-rm", "--model", trained, "--data", files / "nogold.jsonl", "--pairs", "preference",
               "--output", out) == 0
    assert "token_auroc" not in json.loads(out.read_text())


def test_cli_errors_are_one_line_exit_2(trained, files, tmp_path, capsys):
    cases = [
        (["train-rm", "--data", tmp_path / "missing.jsonl", "--model", files / "base", "--output", tmp_path / "o"],
         "missing.jsonl: no such file"),
        (["train-rm", "--data", files / "train.jsonl", "--model", trained, "--loss", "sequence", "--output",
          tmp_path / "o"], "is a token reward model"),
        (["eval-rm", "--model", tmp_path / "nowhere", "--data", files / "heldout.jsonl", "--output", tmp_path / "r"],
         "reward model directory not found"),
        (["eval-rm", "--model", files / "base", "--data", files / "heldout.jsonl", "--output", tmp_path / "r"],
         "is not a reward model"),
        (["train-rm", "--data", files / "train.jsonl", "--model", files / "base", "--output", tmp_path / "o",
          "--epochs", "0"], "--epochs must be > 0"),
    ]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "p", "rejected": "a", "edited": 3}\n')
    cases.append((["eval-rm", "--model", trained, "--data", tmp_path / "bad.jsonl", "--output", tmp_path / "r"],
                  "line 1: field 'edited'"))
    for argv, message in cases:
        assert cli(*argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and "Traceback" not in err, err


def test_eval_rm_skip_invalid_counts_the_rejected_and_unchanged_pairs_and_names_the_rejects(trained, files,
                                                                                              tmp_path, capsys):
    """--skip-invalid wrote a rejects file that the summary neither counted nor named, nor the pairs dropped
    because the edit changed nothing: both are counted (as train-rm names them) and the file named."""
    rows = synthetic_pairs(6, seed=3, prefix="s")
    rows[1] = dict(rows[1], edited=rows[1]["rejected"])  # an edit that changed nothing
    data = tmp_path / "mixed.jsonl"
    write_jsonl(data, rows + [{"prompt": "p", "rejected": "a", "edited": 3}])  # an invalid record
    out = tmp_path / "res.json"
    capsys.readouterr()
    assert cli("eval-rm", "--model", trained, "--data", data, "--output", out, "--skip-invalid") == 0
    res = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == res
    assert (res["n_pairs"], res["n_rejected"], res["n_dropped_unchanged"]) == (5, 1, 1)
    assert res["rejects"] == str(tmp_path / "mixed.rejects.jsonl")
    assert len(Path(res["rejects"]).read_text().splitlines()) == 1
    assert cli("eval-rm", "--model", trained, "--data", files / "heldout.jsonl", "--output", out) == 0
    res = json.loads(out.read_text())
    assert (res["n_rejected"], res["n_dropped_unchanged"], res["rejects"]) == (0, 0, None)


def test_reward_model_api(trained):
    rm = RewardModel.load(str(trained))
    rows = synthetic_pairs(5, seed=7)
    prompts, responses = [r["prompt"] for r in rows], [r["rejected"] for r in rows]
    scores = rm.score(prompts, responses, batch_size=2)
    tr = rm.token_rewards(prompts, responses, batch_size=3)
    for s, t, resp in zip(scores, tr, responses):
        assert len(t.tokens) == len(t.offsets) == len(t.rewards)
        assert s == pytest.approx(sum(t.rewards) / len(t.rewards), abs=1e-5)   # Eq. 1
        assert "".join(resp[a:b] for a, b in t.offsets).replace(" ", "") == resp.replace(" ", "")
        assert t.offsets[-1] == (len(resp), len(resp)) and t.tokens[-1] == rm.tokenizer.eos_token
    examples = [rm.encode(p, r) for p, r in zip(prompts, responses)]
    rewards, mask = rm.forward_batch(examples)
    assert rewards.shape == mask.shape == (5, max(len(e.input_ids) for e in examples))
    assert torch.all(rewards[mask == 0] == 0)
    assert mask.sum(1).tolist() == [e.response_end - e.response_start for e in examples]
    assert rm.score_batch(examples).tolist() == pytest.approx(scores, abs=1e-5)


def test_best_f1_threshold_hand_computed():
    from finegrain.rm.evaluate import best_f1_threshold

    # flag the 2 lowest: P = 1, R = 1 -> the cut lies halfway between -1 and 0.5
    assert best_f1_threshold([-2.0, -1.0, 0.5, 1.0], [True, True, False, False]) == -0.25
    # ties are flagged together: cutting inside the tie at -1 is impossible
    # k=1: P 1, R 1/3 -> F1 .5; k=3 (the tie): P 2/3, R 2/3 -> .667; k=4: P 3/4, R 1 -> .857
    assert best_f1_threshold([-3.0, -1.0, -1.0, 2.0], [True, False, True, True]) == 3.0
    assert best_f1_threshold([1.0, 2.0], [False, False]) is None


def test_localisation_metrics_hand_computed():
    from finegrain.rm.evaluate import flagged_spans, localisation, span_scores

    # two worse responses; offsets of 4 tokens + a closing token each
    off = [(0, 2), (2, 4), (4, 6), (6, 8), (8, 8)]
    worse = [[-2.0, 1.0, -1.0, 2.0, 0.0], [1.0, 1.0, 1.0, -3.0, 1.0]]
    labels = [[True, False, True, False, False], [False, False, False, False, False]]
    gold = [[(0, 2), (4, 6)], []]
    better = [[1.0, -0.5, 2.0], [0.5, 0.5]]
    loc = localisation(worse, labels, [off, off], gold, better, threshold=-0.5)
    # pooled AUROC over 10 tokens, 2 positives (-2, -1 -> scores 2, 1) vs 8 negatives (scores -1,-2,0,-1,-1,-1,3,-1)
    # positive 2 beats 7 of 8 (not 3); positive 1 beats 7 -> 14 / 16
    assert loc["token_auroc"] == pytest.approx(14 / 16)
    assert loc["response_auroc"] == 1.0 and loc["response_auroc_n"] == 1      # the 2nd response has no positive
    # flagged (< -0.5): response 1 tokens 0, 2; response 2 token 3 -> token P = 2/3, R = 2/2
    assert loc["token_precision"] == pytest.approx(2 / 3) and loc["token_recall"] == 1.0
    assert loc["token_f1"] == pytest.approx(0.8)
    assert loc["worse_flagged_rate"] == pytest.approx(3 / 10) and loc["better_flagged_rate"] == pytest.approx(0.0)
    # spans: (0,2), (4,6) in response 1 (both right), (6,8) in response 2 (wrong); both gold spans found
    assert flagged_spans(off, worse[0], -0.5) == [(0, 2), (4, 6)]
    assert loc["span_precision"] == pytest.approx(2 / 3) and loc["span_recall"] == 1.0
    assert loc["span_f1"] == pytest.approx(0.8)
    assert span_scores([[(0, 10)]], [[(1, 2), (5, 6)]]) == {"span_precision": 1.0, "span_recall": 1.0,
                                                           "span_f1": 1.0, "n_pred_spans": 1, "n_gold_spans": 2}
    # without a threshold: the rank figures only
    assert "span_f1" not in localisation(worse, labels, [off, off], gold, better, threshold=None)


def test_eval_rm_warns_when_its_data_is_the_reward_models_own(tmp_path, caplog):
    """Training data, or the held-out split that picked the kept weights and the threshold: one warning line."""
    from finegrain.rm.evaluate import warn_if_seen_in_training

    train, held, other = (tmp_path / f"{n}.jsonl" for n in ("train", "held", "other"))
    for f in (train, held, other):
        f.write_text("{}\n")
    meta = {"data": str(train), "eval_data": str(held)}
    with caplog.at_level("WARNING", logger="finegrain.rm.evaluate"):
        assert warn_if_seen_in_training(str(tmp_path / "." / "train.jsonl"), meta) == "training data"
        assert warn_if_seen_in_training(str(held), meta).startswith("held-out split")
        assert warn_if_seen_in_training(str(other), meta) is None
        assert warn_if_seen_in_training(str(other), {"data": str(tmp_path / "gone.jsonl"), "eval_data": None}) is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "not held-out" in lines[0] and "picked the kept weights" in lines[1]
