"""The bad-input corpus: every kind of bad record gives exit code 2 and ONE line naming file, record, field."""
from __future__ import annotations

import json

import pytest

from finegrain.cli import main
from finegrain.data import load_pairs, load_pairs_report
from finegrain.errors import InputError

AF = {"instruction": "Name a colour.", "input": "", "output_1": "Blue.", "output_2": "A car.", "preference": 1}
HH = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}
QA = {"question": "Who wrote Hamlet?", "passages": [["Hamlet", "It was written by Shakespeare."]],
      "prediction 1": "Hamlet was written by Marlowe.", "prediction 2": "Shakespeare.", "prediction 3": "Shakespeare!",
      "prediction 4": "Nobody.", "preference": [2, 2, 1, 0, 1, 1],
      "feedback": {"errors": [{"error type": "Wrong-Grounding", "start": 22, "end": 29}],
                   "corrected-prediction": "Hamlet was written by Shakespeare."}}
OA = {"message_tree_id": "t", "prompt": {"message_id": "m", "role": "prompter", "text": "Hi", "replies": [
    {"message_id": "a", "role": "assistant", "text": "Hello", "rank": 0, "replies": []},
    {"message_id": "b", "role": "assistant", "text": "Go away", "rank": 1, "replies": []}]}}


def af(**kw):
    return {**AF, **kw}


def qa_fb(**kw):
    return {**QA, "feedback": {**QA["feedback"], **kw}}


def lines(*records) -> bytes:
    """JSONL bytes; a bytes item is written verbatim (for broken lines)."""
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records)


GOOD = lines(AF)
# (kind of error, --from, file content (bytes), record named, field named, words in the message)
CORPUS = [
    ("missing field", "alpacafarm", lines(AF, {k: v for k, v in AF.items() if k != "output_2"}),
     "line 2", "output_2", "missing"),
    ("empty string", "alpacafarm", lines(af(output_1="")), "line 1", "output_1", "non-empty"),
    ("whitespace-only string", "alpacafarm", lines(af(output_2=" \n\t")), "line 1", "output_2", "whitespace"),
    ("number instead of text", "alpacafarm", lines(af(instruction=5)), "line 1", "instruction", "got int"),
    ("list instead of text", "hh", lines({**HH, "chosen": ["a"]}), "line 1", "chosen", "got list"),
    ("null instead of text", "alpacafarm", lines(AF, af(output_2=None)), "line 2", "output_2", "got null"),
    ("invalid UTF-8", "alpacafarm", lines(AF, b'{"instruction": "caf\xe9", "input": "", "output_1": "a", '
                                          b'"output_2": "b", "preference": 1}'), "line 2", "instruction", "UTF-8"),
    ("invalid JSON line", "alpacafarm", lines(AF, af(output_1="Red."), b'{"instruction": "x",'), "line 3", None,
     "invalid JSON"),
    ("record not an object", "hh", lines(HH, [1, 2]), "line 2", None, "got list"),
    ("duplicate id", "alpacafarm", lines(af(id="a"), af(id="a", output_1="Red.")), "line 2", "id",
     "duplicate id: 'a' was already used at line 1"),
    ("duplicate content without id", "hh", lines(HH, HH), "line 2", "id", "duplicate content"),
    ("non-string id", "alpacafarm", lines(af(id=["x"])), "line 1", "id", "got list"),
    ("gold span outside the text", "qa-feedback",
     lines(qa_fb(errors=[{"error type": "Irrelevant", "start": 20, "end": 99}])), "line 1", "feedback['errors']",
     "outside the text"),
    ("span with start >= end", "qa-feedback", lines(qa_fb(errors=[{"start": 9, "end": 9}])), "line 1",
     "feedback['errors']", "empty or reversed"),
    ("span not a pair of ints", "qa-feedback", lines(qa_fb(errors=[{"start": "3", "end": 9}])), "line 1",
     "feedback['errors']", "pair of integers"),
    ("span entry not an object", "qa-feedback", lines(qa_fb(errors=[[3, 9]])), "line 1", "feedback['errors']",
     "'start' and 'end'"),
    ("preference label not 1 or 2", "alpacafarm", lines(af(preference=1.5)), "line 1", "preference", "got 1.5"),
    ("qa labels malformed", "qa-feedback", lines({**QA, "preference": [1, 2]}), "line 1", "preference", "6 labels"),
    ("feedback not a literal", "qa-feedback", lines({**QA, "feedback": "{'errors': [oops"}), "line 1", "feedback",
     "literal"),
    ("empty edit", "qa-feedback", lines(qa_fb(**{"corrected-prediction": ""})), "line 1",
     "feedback['corrected-prediction']", "non-empty"),
    ("chosen == rejected", "alpacafarm", lines(af(output_2="Blue.")), "line 1", "output_1", "identical"),
    ("no shared HH prefix", "hh", lines({"chosen": "Human: a", "rejected": "Human: b"}), "line 1", "rejected",
     "Assistant:"),
    ("empty last HH turn", "hh", lines({**HH, "chosen": "\n\nHuman: Hi\n\nAssistant: "}), "line 1", "chosen",
     "last Assistant turn is empty"),
    ("NUL character", "alpacafarm", lines(af(output_1="Blue\u0000.")), "line 1", "output_1", "U+0000"),
    ("escape character", "hh", lines({**HH, "rejected": HH["rejected"] + "\u001b[31m"}), "line 1", "rejected",
     "U+001B"),
    ("oasst rank not an integer", "oasst", lines(
        {**OA, "prompt": {**OA["prompt"], "replies": [{**OA["prompt"]["replies"][0], "rank": "first"}]}}),
     "line 1", "prompt.replies[0].rank", "integer"),
    ("oasst message text missing", "oasst", lines({**OA, "prompt": {"role": "prompter", "replies": []}}), "line 1",
     "prompt.text", "got null"),
]


@pytest.mark.parametrize("name,source,content,record,field,words", CORPUS, ids=[c[0] for c in CORPUS])
def test_cli_bad_input_gives_one_line_naming_file_record_field(tmp_path, capsys, name, source, content, record,
                                                                 field, words):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    assert main(["convert", "--from", source, str(path), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("finegrain convert: error: "), err
    assert str(path) in err and f": {record}: " in err and words in err, err
    if field is not None:
        assert f"field {field!r}" in err, err
    assert not (tmp_path / "out" / "pairs.jsonl").exists()  # nothing half-written


# one more good record per source, appended to each bad case for the --skip-invalid run
EXTRA_GOOD = {"alpacafarm": af(output_1="Green."), "hh": {**HH, "rejected": HH["rejected"] + " Now."},
              "qa-feedback": {**QA, "question": "Who wrote Macbeth?"},
              "oasst": {**OA, "message_tree_id": "t2", "prompt": {**OA["prompt"], "message_id": "m2"}}}


def test_skip_invalid_over_the_whole_corpus_keeps_good_records(tmp_path, capsys):
    """With --skip-invalid each bad case is rejected (exit 0) and the good records survive."""
    for name, source, content, record, field, words in CORPUS:
        path = tmp_path / f"{source}.jsonl"
        path.write_bytes(content + lines(EXTRA_GOOD[source]))
        out = tmp_path / name.replace(" ", "_")
        assert main(["convert", "--from", source, str(path), "--output", str(out), "--skip-invalid"]) == 0, name
        summary = json.loads(capsys.readouterr().out)
        assert summary["n_rejected"] >= 1 and summary["n_pairs"] >= 1, name
        rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
        assert any(r["location"] == record and words in r["error"] for r in rejects), name


def test_file_not_found_and_empty_file(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    assert main(["convert", "--from", "hh", str(missing), "--output", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"finegrain convert: error: {missing}: no such file\n"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert main(["convert", "--from", "hh", str(empty), "--output", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"finegrain convert: error: {empty}: no records (the file is empty)\n"
    with pytest.raises(InputError, match="no records"):
        load_pairs(empty)


def test_unknown_source_and_missing_options_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["convert", "--from", "shp", "x.jsonl", "--output", str(tmp_path)])
    assert e.value.code == 2 and "invalid choice: 'shp'" in capsys.readouterr().err
    assert main(["convert", "x.jsonl", "--output", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "finegrain convert: error: missing required option --from\n"


# loader-only kinds (files in the pair format itself, read by train-rm / eval-rm / edit)
EDIT = {"id": "e", "prompt": "P", "rejected": "You are dumb", "edited": "You are right"}
LOADER_CORPUS = [
    ("edit_meta not an object", "edit", {**EDIT, "edit_meta": "claude"}, "edit_meta", "must be an object"),
    ("edited missing", "edit", {k: v for k, v in EDIT.items() if k != "edited"}, "edited", "run `finegrain edit`"),
    ("gold_spans not a list", "edit", {**EDIT, "gold_spans": {"0": 3}}, "gold_spans", "list of [start, end]"),
    ("span of three numbers", "edit", {**EDIT, "gold_spans": [[0, 3, 5]]}, "gold_spans", "pair of integers"),
    ("negative span", "edit", {**EDIT, "gold_spans": [[-1, 3]]}, "gold_spans", "outside the text"),
    ("blank id", "preference", {"id": " ", "prompt": "P", "chosen": "a", "rejected": "b"}, "id", "non-empty"),
    ("boolean id", "preference", {"id": True, "prompt": "P", "chosen": "a", "rejected": "b"}, "id", "got bool"),
    ("lone surrogate", "preference", {"prompt": "P\ud800", "chosen": "a", "rejected": "b"}, "prompt", "surrogate"),
    ("chosen missing in preference", "preference", {"prompt": "P", "rejected": "b"}, "chosen", "missing"),
    ("chosen == rejected", "preference", {"prompt": "P", "chosen": "same", "rejected": "same"}, "chosen",
     "identical"),
]


@pytest.mark.parametrize("name,kind,rec,field,words", LOADER_CORPUS, ids=[c[0] for c in LOADER_CORPUS])
def test_loader_bad_records_name_file_record_field(tmp_path, name, kind, rec, field, words):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({**EDIT, "id": "ok"} if kind == "edit" else
                               {"prompt": "P", "chosen": "x", "rejected": "y"}) + "\n" + json.dumps(rec) + "\n")
    with pytest.raises(InputError) as e:
        load_pairs(path, kind)
    msg = str(e.value)
    assert msg.startswith(f"{path}: line 2: field {field!r}: ") and words in msg, msg
    rep = load_pairs_report(path, kind, skip_invalid=True)
    assert (len(rep.pairs), rep.n_rejected, dict(rep.errors)) == (1, 1, {field: 1})


def test_json_file_with_a_non_object_and_bad_bytes_is_located_by_index(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_bytes(b'[{"prompt": "P", "chosen": "a", "rejected": "b"}, {"prompt": "P", "chosen": "\xff", '
                     b'"rejected": "b"}, 7]')
    expected = r"pairs\.json: index 1: field 'chosen': text is not valid UTF-8 \(byte 0xff\)"
    with pytest.raises(InputError, match=expected):
        load_pairs(path)
    rep = load_pairs_report(path, skip_invalid=True)
    assert (len(rep.pairs), rep.n_records, rep.n_rejected) == (1, 3, 2)
    rejects = [json.loads(x) for x in open(rep.rejects_path, encoding="utf-8")]
    assert [r["location"] for r in rejects] == ["index 1", "index 2"]
    assert rejects[0]["record"]["chosen"] == "\ufffd"  # undecodable byte shown as U+FFFD in the rejects file


def test_all_records_invalid_is_an_error_even_when_skipping(tmp_path, capsys):
    path = tmp_path / "af.jsonl"
    path.write_bytes(lines(AF, af(output_1="Red.")))
    out = tmp_path / "out"
    assert main(["convert", "--from", "hh", str(path), "--output", str(out), "--skip-invalid"]) == 2
    assert capsys.readouterr().err == (
        f"finegrain convert: error: {path}: no valid pair in 2 records (wrong format?); the first error: line 1: "
        f"field 'chosen': missing (all in {out / 'rejects.jsonl'})\n")
    assert len((out / "rejects.jsonl").read_text().splitlines()) == 2
