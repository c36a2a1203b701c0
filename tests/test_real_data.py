"""The real-data examples' plumbing: question-level split, diagnostics, results table, and a few
reward-model steps on the real qa-feedback and HH files with a tiny model built from a config.

Tests that read ../shared/data skip with the reason when it is absent (``require_shared``); the
conversion counts themselves are tested in test_convert.py and not repeated here.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import require_shared

from finegrain.config import build_config
from finegrain.data import convert
from finegrain.io import iter_records, write_json, write_jsonl
from finegrain.models import save_checkpoint
from finegrain.scratch import tiny_gpt2_config, train_bpe_tokenizer
from finegrain.rm import EvalRMConfig, TrainRMConfig, evaluate_reward_model, train_reward_model

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load_example(relpath: str):
    """Import a script of examples/ as a module (they are scripts, not a package)."""
    path = EXAMPLES / relpath
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


split_mod = _load_example("qa_feedback/split_by_question.py")
diagnose_mod = _load_example("qa_feedback/diagnose.py")
table_mod = _load_example("qa_feedback/make_table.py")
length_mod = _load_example("qa_feedback/analyze_length.py")
sys.modules.setdefault("analyze_length", length_mod)  # length_debias.py imports it by its script name
debias_mod = _load_example("qa_feedback/length_debias.py")


def _rows(path: Path) -> list[dict]:
    return [r for _, r in iter_records(path)]


# ---------------------------------------------------------------- example scripts on small inline data

def test_split_keeps_every_question_on_one_side(tmp_path):
    pairs = [{"id": f"q{q}:{k}", "question_id": f"q{q}", "prompt": f"Question {q}?", "chosen": "a", "rejected": "b"}
             for q in range(10) for k in range(3)]
    edits = [{"id": f"q{q}:edit", "question_id": f"q{q}", "prompt": f"Question {q}?", "rejected": "b", "edited": "c"}
             for q in range(10)]
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    write_jsonl(tmp_path / "edits.jsonl", edits)
    s = split_mod.split_files([str(tmp_path / "pairs.jsonl"), str(tmp_path / "edits.jsonl")], tmp_path / "s", 0.3, 0)
    assert s["n_questions"] == 10 and s["n_test_questions"] == 3
    assert s["files"]["pairs.jsonl"] == {"train": 21, "test": 9} and s["files"]["edits.jsonl"] == {"train": 7, "test": 3}
    test_q = {r["question_id"] for r in _rows(tmp_path / "s" / "test" / "pairs.jsonl")}
    assert test_q == {r["question_id"] for r in _rows(tmp_path / "s" / "test" / "edits.jsonl")}
    assert not test_q & {r["question_id"] for r in _rows(tmp_path / "s" / "train" / "pairs.jsonl")}
    # the same seed gives the same split, records are written unchanged
    assert split_mod.test_questions({f"q{q}" for q in range(10)}, 0.3, 0) == test_q
    assert sorted(_rows(tmp_path / "s" / "test" / "pairs.jsonl") + _rows(tmp_path / "s" / "train" / "pairs.jsonl"),
                  key=lambda r: r["id"]) == sorted(pairs, key=lambda r: r["id"])


def test_split_falls_back_to_the_prompt_and_names_a_bad_record(tmp_path):
    from finegrain.errors import InputError

    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x", "chosen": "a", "rejected": "b"},
                                       {"prompt": "x", "chosen": "c", "rejected": "d"},
                                       {"prompt": "y", "chosen": "a", "rejected": "b"}])
    s = split_mod.split_files([str(tmp_path / "p.jsonl")], tmp_path / "s", 0.5, 0)
    assert s["n_questions"] == 2 and sorted(s["files"]["p.jsonl"].values()) == [1, 2]
    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x"}, {"chosen": "a"}])
    with pytest.raises(InputError, match=r"bad\.jsonl: line 2: field 'prompt'"):
        split_mod.split_files([str(tmp_path / "bad.jsonl")], tmp_path / "s2", 0.5, 0)


def test_length_heuristic_by_hand():
    # better has 2 words vs 4 (shorter), 3 vs 1 (longer), 2 vs 2 (tie = 1/2): shorter wins 1.5 / 3
    pairs = [("a b", "a b c d"), ("a b c", "a"), ("x y", "y x")]
    h = diagnose_mod.heuristics(pairs)
    assert h["shorter_is_better"] == 0.5 and h["longer_is_better"] == 0.5 and h["n"] == 3
    assert h["se"] == round((0.25 / 3) ** 0.5, 4)


def test_edit_summary_by_hand():
    rows = [{"rejected": "The cat sat on the mat.", "edited": "The cat sat.", "gold_spans": [[12, 22]]},
            {"rejected": "Paris is big.", "edited": "Paris is large.", "gold_spans": None}]
    s = diagnose_mod.edit_summary(rows)
    assert s["n"] == 2 and s["only_deletes"] == 0.5 and s["with_error_spans"] == 0.5
    # span share: 10/23 characters of the first, 0 of the second
    assert s["error_span_char_share"]["mean"] == round((10 / 23) / 2, 3)


def test_length_analysis_by_hand():
    # pair 0: better shorter, ranked right; pair 1: better longer, ranked wrong; pair 2: tie in score
    res = length_mod.length_split(better=[2.0, 0.0, 1.0], worse=[1.0, 3.0, 1.0], len_better=[5, 9, 4],
                                  len_worse=[8, 6, 7])
    assert res["all"] == {"n": 3, "accuracy": 0.5}
    assert res["better_is_shorter"] == {"n": 2, "accuracy": 0.75} and res["better_is_longer"] == {"n": 1, "accuracy": 0.0}
    assert length_mod.ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]
    assert length_mod.spearman([1.0, 2.0, 3.0], [30.0, 20.0, 10.0]) == pytest.approx(-1.0)
    # scores [2,0,1,1,3,1] -> ranks [5,1,3,3,6,3]; lengths [5,9,4,8,6,7] -> ranks [2,6,1,5,3,4];
    # centred at 3.5: sum of products -9.5, sums of squares 15.5 and 17.5 -> -9.5 / sqrt(15.5 * 17.5)
    assert res["spearman_score_vs_words"] == round(-9.5 / (15.5 * 17.5) ** 0.5, 4)


def test_results_table_reads_eval_files(tmp_path):
    for name, pref, edit in (("a_seq_pref", 0.6, 0.55), ("c_token_edit", 0.52, 0.7)):
        write_json(tmp_path / name / "eval_preference.json", {"accuracy": pref, "accuracy_se": 0.025, "n_pairs": 375})
        edit_res = {"accuracy": edit, "accuracy_se": 0.05, "n_pairs": 68}
        if name.startswith("c"):
            edit_res.update(token_auroc=0.6123, token_auroc_source="gold_spans")
        write_json(tmp_path / name / "eval_edit.json", edit_res)
    (tmp_path / "a_seq_pref" / "train_seconds.txt").write_text("300\n")
    (tmp_path / "c_token_edit" / "train_seconds.txt").write_text("90\n")
    md, results = table_mod.table(tmp_path)
    lines = md.splitlines()
    assert len(lines) == 4  # header, rule, the two RMs that have results
    assert "| (a) |" in lines[2] and "60.0 ± 2.5 (n=375)" in lines[2] and "5.0 min" in lines[2]
    assert "n/a (one score)" in lines[2]
    assert "70.0 ± 5.0 (n=68)" in lines[3] and "0.612" in lines[3] and "1.5 min" in lines[3]
    assert results["c_token_edit"]["train_seconds"] == 90.0


# ---------------------------------------------------------------- real files (skipped when absent)

@pytest.fixture(scope="module")
def qa_split(tmp_path_factory) -> Path:
    """qa-feedback converted with question-only prompts (as run.sh does) and split by question."""
    path = require_shared("qa_feedback", "dev_feedback_350.json")
    root = tmp_path_factory.mktemp("qa")
    convert("qa-feedback", path, root / "converted", skip_invalid=True, qa_prompt_style="question")
    split_mod.split_files([str(root / "converted" / "pairs.jsonl"), str(root / "converted" / "edits.jsonl")],
                          root / "split", 0.2, 0)
    return root


def test_real_qa_feedback_split_by_question(qa_split):
    raw = json.loads(require_shared("qa_feedback", "dev_feedback_350.json").read_text())
    questions = {r["question"] for r in raw}
    sides = {}
    for side in ("train", "test"):
        rows = _rows(qa_split / "split" / side / "pairs.jsonl") + _rows(qa_split / "split" / side / "edits.jsonl")
        assert all(r["prompt"] in questions for r in rows)  # --qa-prompt question: the prompt is the question
        sides[side] = {r["question_id"] for r in rows}
    assert not sides["train"] & sides["test"]
    assert len(sides["test"]) == 70 and len(sides["train"] | sides["test"]) == 350
    edits = _rows(qa_split / "split" / "test" / "edits.jsonl")
    assert all(r["edited"] != r["rejected"] for r in edits)
    assert all(0 <= a < b <= len(r["rejected"]) for r in edits for a, b in r.get("gold_spans") or [])


def _tiny_rm_base(path: Path, texts: list[str]) -> Path:
    """A 2-layer GPT-2 (hidden 32) and a BPE tokenizer trained on ``texts``: the real data, not the real model."""
    from transformers import GPT2LMHeadModel

    tok = train_bpe_tokenizer(texts, vocab_size=400)
    torch.manual_seed(0)
    save_checkpoint(path, GPT2LMHeadModel(tiny_gpt2_config(len(tok), eos_token_id=tok.eos_token_id,
                                                           pad_token_id=tok.pad_token_id, n_positions=96)),
                    tok, {"kind": "causal"})
    return path


def _first_block_weight(model_dir: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    state = load_file(str(model_dir / "model.safetensors"))
    (key,) = [k for k in state if k.endswith("h.0.attn.c_attn.weight")]
    return state[key]


def _train_and_eval(base: Path, train: Path, test: Path, out: Path, loss: str, pairs: str) -> tuple[dict, dict]:
    summary = train_reward_model(build_config(TrainRMConfig, dict(
        data=str(train), model=str(base), output=str(out), loss=loss, pairs=pairs, eval_fraction=0.0, epochs=1,
        batch_size=4, lr=1e-3, warmup_ratio=0.0, max_length=96, eval_every=0, save_every=0, log_with="none")))
    res = evaluate_reward_model(build_config(EvalRMConfig, dict(
        model=str(out), data=str(test), output=str(out / "eval.json"), pairs=pairs)))
    return summary, res


def test_real_qa_feedback_token_rm_steps(qa_split, tmp_path):
    """A few token_edit steps on 12 real human edits; held-out eval scores tokens against the human error spans."""
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    write_jsonl(train, _rows(qa_split / "split" / "train" / "edits.jsonl")[:12])
    held = [r for r in _rows(qa_split / "split" / "test" / "edits.jsonl") if r.get("gold_spans")][:6]
    write_jsonl(test, held)
    texts = [t for r in _rows(train) + held for t in (r["prompt"], r["rejected"], r["edited"])]
    base = _tiny_rm_base(tmp_path / "base", texts)
    summary, res = _train_and_eval(base, train, test, tmp_path / "rm", "token_edit", "edit")
    # an edit that only changes text beyond the 96-token cut is invisible to the RM: dropped as unchanged
    assert summary["n_train"] + summary["n_dropped_unchanged"] == 12 and summary["n_train"] >= 4
    assert summary["kind"] == "token" and summary["steps"] == -(-summary["n_train"] // 4)
    assert not torch.equal(_first_block_weight(base), _first_block_weight(tmp_path / "rm"))
    assert res["n_pairs"] == 6 and res["token_auroc_source"] == "gold_spans"
    assert 0.0 <= res["token_auroc"] <= 1.0 and res["token_auroc_n_pos"] > 0
    assert res["n_truncated"] > 0  # ~90-word answers do not fit 96 tokens: the policy cuts, never fails


def test_real_hh_sequence_rm_steps(tmp_path):
    """Two sequence-RM steps on 8 real HH pairs (long multi-turn prompts cut from the left)."""
    path = require_shared("hh_rlhf", "harmless_base_test_1800.jsonl.gz")
    convert("hh", path, tmp_path / "hh", skip_invalid=True)
    rows = _rows(tmp_path / "hh" / "pairs.jsonl")
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    write_jsonl(train, rows[:8])
    write_jsonl(test, rows[8:14])
    base = _tiny_rm_base(tmp_path / "base", [t for r in rows[:14] for t in (r["prompt"], r["chosen"], r["rejected"])])
    summary, res = _train_and_eval(base, train, test, tmp_path / "rm", "sequence", "preference")
    assert summary["kind"] == "sequence" and summary["steps"] == 2
    assert not torch.equal(_first_block_weight(base), _first_block_weight(tmp_path / "rm"))
    assert res["n_pairs"] == 6 and "token_auroc" not in res and 0.0 <= res["accuracy"] <= 1.0


def test_length_debias_lines_and_corrections():
    assert debias_mod.line([1, 2, 3], [3, 5, 7]) == pytest.approx((1.0, 2.0))
    assert debias_mod.accuracy([1.0, 2.0], [0.0, 2.0]) == 0.75  # a tie counts one half
    # token rewards minus a + b * (their response's length): 0.5 + 0.25 * 2 = 1.0, and 0.5 + 0.25 * 1 = 0.75
    assert debias_mod.token_shift([[1.0, 2.0], [4.0]], 0.5, 0.25) == [[0.0, 1.0], [3.25]]
    data = {"better": {"scores": [2.0], "words": [4], "rewards": [[1.0, 2.0]]},
            "worse": {"scores": [1.0], "words": [1], "rewards": [[4.0]]}}
    by_score = debias_mod.corrected(data, "score", (9.0, 0.5))  # the score's own line: s - 0.5 * words
    assert by_score["better"]["scores"] == [0.0] and by_score["worse"]["scores"] == [0.5]
    assert by_score["better"]["rewards"] == [[1.0, 2.0]]  # token rewards untouched
    by_token = debias_mod.corrected(data, "token", (0.5, 0.25))
    assert by_token["better"]["rewards"] == [[0.0, 1.0]] and by_token["better"]["scores"] == [0.5]
    assert by_token["worse"]["scores"] == [3.25]
    assert data["better"]["scores"] == [2.0]  # the input is not changed
