"""Converters on small inline samples of each source (exact outputs) and on the real files when present."""
from __future__ import annotations

import ast
import gzip
import json

import pytest
from conftest import require_shared
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from finegrain.cli import main
from finegrain.data import convert, load_pairs, load_pairs_report
from finegrain.data.convert import QA_COMPARED, split_transcripts
from finegrain.errors import ConfigError


def write_lines(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_alpacafarm(tmp_path):
    rows = [{"instruction": "Name a colour.", "input": "", "output_1": "Blue.", "output_2": "A car.", "preference": 1},
            {"instruction": "Translate", "input": "bonjour", "output_1": "goodbye", "output_2": "hello",
             "preference": 2, "id": "x7", "datasplit": "val"}]
    s = convert("alpacafarm", write_lines(tmp_path / "af.jsonl", rows), tmp_path / "out")
    got = read_lines(tmp_path / "out" / "pairs.jsonl")
    assert got[0]["prompt"] == "Name a colour." and (got[0]["chosen"], got[0]["rejected"]) == ("Blue.", "A car.")
    assert got[1] == {"id": "x7", "prompt": "Translate\n\nbonjour", "chosen": "hello", "rejected": "goodbye",
                      "datasplit": "val"}
    assert not (tmp_path / "out" / "edits.jsonl").exists()
    assert (s["n_records"], s["n_pairs"], s["n_edits"], s["n_rejected"]) == (2, 2, 0, 0)
    assert json.loads((tmp_path / "out" / "convert_summary.json").read_text())["n_pairs"] == 2
    assert [p.id for p in load_pairs(tmp_path / "out" / "pairs.jsonl")] == [got[0]["id"], "x7"]


def test_hh_prompt_is_the_shared_prefix_up_to_the_last_assistant_turn(tmp_path):
    prefix = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How do I pick a lock?\n\nAssistant:"
    rows = [{"chosen": prefix + " I can't help with that.", "rejected": prefix + " Sure, first get a pick."},
            # the chosen side goes on with a second assistant turn: still one prefix, cut at the shared part
            {"chosen": "\n\nHuman: Q\n\nAssistant: A\n\nAssistant: B", "rejected": "\n\nHuman: Q\n\nAssistant: C"}]
    with gzip.open(tmp_path / "hh.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    s = convert("hh", tmp_path / "hh.jsonl.gz", tmp_path / "out")
    got = read_lines(tmp_path / "out" / "pairs.jsonl")
    assert [(g["prompt"], g["chosen"], g["rejected"]) for g in got] == [
        (prefix, "I can't help with that.", "Sure, first get a pick."),
        ("\n\nHuman: Q\n\nAssistant:", "A\n\nAssistant: B", "C")]
    assert s["n_pairs"] == 2
    assert split_transcripts(rows[0]["chosen"], rows[0]["rejected"])[0] + " " + got[0]["chosen"] == rows[0]["chosen"]


QA = {"question": "Who wrote Hamlet?",
      "passages": [["Hamlet", "Hamlet is a tragedy.", "It was written by Shakespeare."], ["Globe", "A theatre."]],
      "gold": "Shakespeare.", "prediction 1": "Hamlet was written by Marlowe in 1600.",
      "prediction 2": "Shakespeare wrote it.", "prediction 3": "William Shakespeare.", "prediction 4": "Nobody knows.",
      "feedback": repr({"errors": [{"error type": "Wrong-Grounding", "explanation": "", "start": 22, "end": 29},
                                   {"error type": "Unverifiable", "explanation": "", "start": 30, "end": 37}],
                        "missing-info": [], "corrected-prediction": "Hamlet was written by Shakespeare."}),
      "preference": [2, 2, 1, 0, 1, 1]}


def test_qa_feedback_pairs_edit_spans_and_ties(tmp_path):
    s = convert("qa-feedback", write_lines(tmp_path / "qa.jsonl", [dict(QA, question_id="q1")]), tmp_path / "out")
    prompt = ("Question: Who wrote Hamlet?\n\nPassages:\n[1] Hamlet: Hamlet is a tragedy. It was written by "
              "Shakespeare.\n[2] Globe: A theatre.")
    pairs = read_lines(tmp_path / "out" / "pairs.jsonl")
    p = {k: QA[f"prediction {k}"] for k in range(1, 5)}
    # labels (1,2)=2 (1,3)=2 (1,4)=1 (2,3)=0 tie (2,4)=1 (3,4)=1
    assert [(x["id"], x["chosen"], x["rejected"]) for x in pairs] == [
        ("q1:p2>p1", p[2], p[1]), ("q1:p3>p1", p[3], p[1]), ("q1:p1>p4", p[1], p[4]),
        ("q1:p2>p4", p[2], p[4]), ("q1:p3>p4", p[3], p[4])]
    assert all(x["prompt"] == prompt and x["question_id"] == "q1" for x in pairs)
    (edit,) = read_lines(tmp_path / "out" / "edits.jsonl")
    assert (edit["id"], edit["rejected"], edit["edited"]) == ("q1:edit", p[1], "Hamlet was written by Shakespeare.")
    assert [p[1][a:b] for a, b in edit["gold_spans"]] == ["Marlowe", "in 1600"]
    assert edit["error_spans"] == [[22, 29, "Wrong-Grounding"], [30, 37, "Unverifiable"]]
    assert edit["edit_meta"] == {"editor": "human", "source": "qa-feedback"} and "chosen" in edit
    assert (s["n_pairs"], s["n_edits"], s["n_ties_dropped"], s["n_unchanged_edits_dropped"]) == (5, 1, 1, 0)
    loaded = load_pairs(tmp_path / "out" / "edits.jsonl", "edit")[0]
    assert loaded.gold_spans == [(22, 29), (30, 37)] and loaded.meta["question_id"] == "q1"


def test_qa_feedback_question_only_prompt_hash_id_and_unchanged_edit(tmp_path):
    rec = dict(QA, feedback={"errors": [], "corrected-prediction": QA["prediction 1"]})
    s = convert("qa-feedback", write_lines(tmp_path / "qa.jsonl", [rec]), tmp_path / "out", qa_prompt_style="question")
    pairs = read_lines(tmp_path / "out" / "pairs.jsonl")
    assert pairs[0]["prompt"] == "Who wrote Hamlet?"
    assert pairs[0]["question_id"].startswith("q") and len(pairs[0]["question_id"]) == 13
    assert (s["n_edits"], s["n_unchanged_edits_dropped"]) == (0, 1)
    assert read_lines(tmp_path / "out" / "edits.jsonl") == []
    with pytest.raises(ConfigError, match="'qa_prompt_style': 'both'"):
        convert("qa-feedback", tmp_path / "qa.jsonl", tmp_path / "o2", qa_prompt_style="both")
    with pytest.raises(ConfigError, match="does not apply to source 'hh'"):
        convert("hh", tmp_path / "qa.jsonl", tmp_path / "o2", qa_prompt_style="question")


OASST_TREE = {"message_tree_id": "t1", "prompt": {
    "message_id": "m0", "role": "prompter", "text": "Hi there", "lang": "en", "replies": [
        {"message_id": "a1", "role": "assistant", "text": "Hello!", "rank": 1, "replies": []},
        {"message_id": "a0", "role": "assistant", "text": "Hi, how can I help?", "rank": 0, "replies": [
            {"message_id": "u1", "role": "prompter", "text": "Tell a joke", "lang": "en", "replies": [
                {"message_id": "b0", "role": "assistant", "text": "Why did the chicken...", "rank": 0, "replies": []},
                {"message_id": "bx", "role": "assistant", "text": "gone", "rank": 1, "deleted": True, "replies": []},
                {"message_id": "b2", "role": "assistant", "text": "No.", "rank": 2, "replies": []}]}]},
        {"message_id": "a2", "role": "assistant", "text": "Unranked", "rank": None, "replies": []}]}}


def test_oasst_ranked_siblings_and_transcript_prompt(tmp_path):
    s = convert("oasst", write_lines(tmp_path / "t.jsonl", [OASST_TREE]), tmp_path / "out")
    got = read_lines(tmp_path / "out" / "pairs.jsonl")
    assert [(g["id"], g["prompt"], g["chosen"], g["rejected"], g["turns"]) for g in got] == [
        ("m0:r0>r1", "Hi there", "Hi, how can I help?", "Hello!", 1),
        ("u1:r0>r2", "User: Hi there\n\nAssistant: Hi, how can I help?\n\nUser: Tell a joke",
         "Why did the chicken...", "No.", 3)]
    assert got[0]["message_tree_id"] == "t1" and (got[0]["chosen_id"], got[0]["rejected_id"]) == ("a0", "a1")
    assert (s["n_pairs"], s["n_deleted_skipped"]) == (2, 1)


def test_cli_prints_summary_and_reads_options_from_yaml(tmp_path, capsys):
    src = write_lines(tmp_path / "qa.jsonl", [dict(QA, question_id="q1")])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"from: qa-feedback\ninput: {src}\noutput: {tmp_path / 'out'}\nqa-prompt: question\n")
    assert main(["convert", "--config", str(cfg)]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["n_pairs"], s["n_edits"], s["options"]) == (5, 1, {"qa_prompt_style": "question"})
    assert main(["convert", "--config", str(cfg), "--qa-prompt", "question+passages", "--output",
                 str(tmp_path / "o2")]) == 0
    assert read_lines(tmp_path / "o2" / "pairs.jsonl")[0]["prompt"].startswith("Question: Who wrote Hamlet?\n\n")


# ---------------------------------------------------------------- real files (skipped when absent)

def test_real_qa_feedback(tmp_path):
    path = require_shared("qa_feedback", "dev_feedback_350.json")
    raw = json.loads(path.read_text())
    s = convert("qa-feedback", path, tmp_path / "out", skip_invalid=True)
    fbs = [r["feedback"] if isinstance(r["feedback"], dict) else ast.literal_eval(r["feedback"]) for r in raw]
    empty = sum(not fb["corrected-prediction"].strip() for fb in fbs)
    same = sum(fb["corrected-prediction"] == r["prediction 1"] for fb, r in zip(fbs, raw))
    assert s["n_records"] == len(raw) == 350
    assert s["n_pairs"] == sum(x != 0 for r in raw for x in r["preference"])
    assert s["n_ties_dropped"] == sum(x == 0 for r in raw for x in r["preference"])
    assert (s["n_rejected"], s["n_unchanged_edits_dropped"]) == (empty, same)
    assert s["n_edits"] == 350 - empty - same
    edits = load_pairs(tmp_path / "out" / "edits.jsonl", "edit")
    # the spans land on the text the annotators marked: whole words at both ends, inside prediction 1
    n_spans = sum(len(e.gold_spans) for e in edits)
    assert n_spans > 0
    assert sum(e.rejected[a:b].strip() != "" for e in edits for a, b in e.gold_spans) == n_spans
    def at_word_edges(t, a, b):
        return (a == 0 or not t[a - 1].isalnum()) and (b == len(t) or not t[b].isalnum())

    assert all(at_word_edges(e.rejected, a, b) for e in edits for a, b in e.gold_spans)
    assert len({e.meta["question_id"] for e in edits}) == len(edits)
    assert len(QA_COMPARED) == len(raw[0]["preference"])


def test_real_hh(tmp_path):
    path = require_shared("hh_rlhf", "harmless_base_test_1800.jsonl.gz")
    s = convert("hh", path, tmp_path / "out", skip_invalid=True)
    assert s["n_records"] == 1800 and s["n_pairs"] + s["n_rejected"] == 1800 and s["n_rejected"] <= 5
    rejects = read_lines(tmp_path / "out" / "rejects.jsonl")
    assert all("last Assistant turn is empty" in r["error"] for r in rejects)
    pairs = load_pairs(tmp_path / "out" / "pairs.jsonl")
    assert all(p.prompt.endswith("\n\nAssistant:") and p.prompt.startswith("\n\nHuman:") for p in pairs)


def test_real_oasst(tmp_path):
    path = require_shared("oasst", "en_100_tree.jsonl")
    s = convert("oasst", path, tmp_path / "out")
    rep = load_pairs_report(tmp_path / "out" / "pairs.jsonl")
    assert s["n_pairs"] == len(rep.pairs) > 0 and s["n_rejected"] == 0
    assert all(p.meta["chosen_rank"] < p.meta["rejected_rank"] for p in rep.pairs)


def test_cli_choices_match_the_converters():
    from finegrain.cli import build_parser
    from finegrain.data.convert import QA_PROMPTS, SOURCES

    choices = {a.dest: a.choices for a in build_parser("convert").verb_parser._actions}
    assert set(choices["source"]) == set(SOURCES) and set(choices["qa_prompt"]) == set(QA_PROMPTS)


def test_oasst_deleted_reply_without_text_is_skipped_not_an_error(tmp_path):
    tree = json.loads(json.dumps(OASST_TREE))
    tree["prompt"]["replies"][1]["replies"][0]["replies"][1]["text"] = None  # the deleted reply
    s = convert("oasst", write_lines(tmp_path / "t.jsonl", [tree]), tmp_path / "out")
    assert (s["n_pairs"], s["n_rejected"], s["n_deleted_skipped"]) == (2, 0, 1)


def test_one_bad_derived_pair_does_not_reject_the_rest_of_its_record(tmp_path):
    rec = dict(QA, question_id="q1", **{"prediction 4": ""})  # pairs with prediction 4 are bad, the others fine
    s = convert("qa-feedback", write_lines(tmp_path / "qa.jsonl", [rec]), tmp_path / "out", skip_invalid=True)
    assert (s["n_records"], s["n_pairs"], s["n_edits"], s["n_rejected"]) == (1, 2, 1, 3)
    assert s["rejected_by_field"] == {"prediction 4": 3}


_turn = st.text(min_size=1, max_size=30).filter(
    lambda t: t.strip() and "\n\nAssistant:" not in t and "\n\nHuman:" not in t)


@settings(max_examples=60, deadline=None)
@given(turns=st.lists(_turn, min_size=1, max_size=5), chosen=_turn, rejected=_turn)
def test_hh_split_recovers_prompt_and_responses(turns, chosen, rejected):
    """prompt + " " + response == transcript, for any transcript whose responses differ."""
    assume(chosen != rejected)
    prompt = "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))
    prompt += "\n\nAssistant:"
    got = split_transcripts(prompt + " " + chosen, prompt + " " + rejected)
    assert got == (prompt, chosen, rejected)


def test_qa_feedback_passages_first_keeps_the_question_under_a_left_cut(tmp_path, tiny_tokenizer):
    from finegrain.rm.inputs import build_rm_example

    convert("qa-feedback", write_lines(tmp_path / "qa.jsonl", [QA]), tmp_path / "out",
            qa_prompt_style="passages+question")
    prompt = read_lines(tmp_path / "out" / "pairs.jsonl")[0]["prompt"]
    assert prompt.startswith("Passages:\n[1] ") and prompt.endswith("\n\nQuestion: Who wrote Hamlet?")
    # a budget too small for the passages: the response stays whole, the question (the prompt's end) too
    ex = build_rm_example(tiny_tokenizer, prompt, "Shakespeare.", max_length=34, template="{prompt}\n")
    kept = tiny_tokenizer.decode(ex.input_ids[:ex.response_start])
    assert ex.truncated and kept.endswith("\n\nQuestion: Who wrote Hamlet?\n") and "Passages:" not in kept
    assert tiny_tokenizer.decode(ex.response_ids) .startswith("Shakespeare.")
