"""load_pairs: formats, ids, meta, spans, drops, rejects file, and a unicode round-trip property."""
from __future__ import annotations

import gzip
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finegrain.data import EditedPair, PreferencePair, load_pairs, load_pairs_report, merge_spans, save_pairs
from finegrain.data.loaders import content_id
from finegrain.errors import ConfigError, InputError


def write_lines(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


PREF = [{"id": "a", "prompt": "Say hi", "chosen": "Hi!", "rejected": "Go away.", "source": "test"},
        {"prompt": "Add 2+2", "chosen": "4", "rejected": "5"}]


def test_preference_records_become_pairs_with_meta_and_content_ids(tmp_path):
    pairs = load_pairs(write_lines(tmp_path / "p.jsonl", PREF))
    assert pairs == [PreferencePair("Say hi", "Hi!", "Go away.", "a", {"source": "test"}),
                     PreferencePair("Add 2+2", "4", "5", content_id("Add 2+2", "4", "5"), {})]
    assert pairs[1].id.startswith("h") and len(pairs[1].id) == 17
    # the content id does not depend on the record's position
    again = load_pairs(write_lines(tmp_path / "q.jsonl", [PREF[1], PREF[0]]))
    assert again[0].id == pairs[1].id


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".json", ".parquet"])
def test_every_file_format_loads_the_same_pairs(tmp_path, suffix):
    rows = [dict(r, id=f"r{i}") for i, r in enumerate(PREF)]
    p = tmp_path / f"pairs{suffix}"
    if suffix == ".jsonl":
        write_lines(p, rows)
    elif suffix == ".jsonl.gz":
        with gzip.open(p, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    elif suffix == ".json":
        p.write_text(json.dumps({"data": rows}))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist([dict(r, source=r.get("source")) for r in rows]), p)
    got = [(x.id, x.prompt, x.chosen, x.rejected) for x in load_pairs(p)]
    assert got == [("r0", "Say hi", "Hi!", "Go away."), ("r1", "Add 2+2", "4", "5")]


def test_edit_records_spans_merged_chosen_optional_and_unchanged_dropped(tmp_path):
    rows = [
        {"id": "e1", "prompt": "P", "rejected": "You are dumb, ok", "edited": "You are right, ok",
         "gold_spans": [[8, 12], [4, 10], [14, 16]], "edit_meta": {"backend": "file"}},
        {"id": "e2", "prompt": "P", "chosen": None, "rejected": "same", "edited": "same"},
        {"id": "e3", "prompt": "P", "chosen": "C", "rejected": "bad", "edited": "good", "note": 1},
    ]
    rep = load_pairs_report(write_lines(tmp_path / "e.jsonl", rows), "edit")
    assert rep.pairs == [
        EditedPair("P", None, "You are dumb, ok", "e1", {}, edited="You are right, ok",
                   edit_meta={"backend": "file"}, gold_spans=[(4, 12), (14, 16)]),
        EditedPair("P", "C", "bad", "e3", {"note": 1}, edited="good", edit_meta={}, gold_spans=None)]
    assert (rep.n_records, rep.n_unchanged, rep.n_spans_merged, rep.n_rejected) == (3, 1, 1, 0)
    assert rep.summary()["n_unchanged_dropped"] == 1


def test_merge_spans_by_hand():
    assert merge_spans([(9, 10), (0, 5), (3, 8)]) == ([(0, 8), (9, 10)], 1)
    assert merge_spans([(0, 2), (2, 4)]) == ([(0, 2), (2, 4)], 0)  # touching is not overlapping
    assert merge_spans([(0, 10), (2, 3), (4, 5)]) == ([(0, 10)], 2)


def test_tabs_newlines_and_long_prompts_are_fine(tmp_path):
    long_prompt = "word " * 50_000
    rows = [{"id": "t", "prompt": long_prompt, "chosen": "a\tb\r\nc", "rejected": "ok\n"}]
    (pair,) = load_pairs(write_lines(tmp_path / "t.jsonl", rows))
    assert pair.prompt == long_prompt and pair.chosen == "a\tb\r\nc"


def test_skip_invalid_writes_rejects_with_record_error_and_location(tmp_path):
    p = tmp_path / "mixed.jsonl"
    p.write_text("\n".join([json.dumps(PREF[0]), "{not json", json.dumps({"prompt": "x", "chosen": 3, "rejected": "y"}),
                            json.dumps(PREF[1])]) + "\n")
    with pytest.raises(InputError, match="line 2"):
        load_pairs(p)
    rep = load_pairs_report(p, skip_invalid=True)
    assert [x.prompt for x in rep.pairs] == ["Say hi", "Add 2+2"]
    assert (rep.n_records, rep.n_rejected) == (4, 2)
    assert rep.rejects_path == str(tmp_path / "mixed.rejects.jsonl")
    rejects = [json.loads(line) for line in open(rep.rejects_path)]
    assert [(r["location"], r["field"]) for r in rejects] == [("line 2", None), ("line 3", "chosen")]
    assert rejects[0]["record"] == "{not json"
    assert rejects[1]["record"] == {"prompt": "x", "chosen": 3, "rejected": "y"}
    assert "must be a string, got int" in rejects[1]["error"] and str(p) in rejects[1]["error"]
    custom = tmp_path / "out" / "bad.jsonl"
    assert load_pairs_report(p, skip_invalid=True, rejects_path=custom).rejects_path == str(custom)
    assert custom.exists()


def test_unknown_kind_is_refused_with_the_choices(tmp_path):
    with pytest.raises(ConfigError, match="unknown pair kind 'edits': use one of preference, edit"):
        load_pairs(write_lines(tmp_path / "p.jsonl", PREF), kind="edits")


# arbitrary unicode text, minus what the loader refuses on purpose (controls, surrogates, blank)
_text = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=40).filter(str.strip)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(_text, _text, _text, _text, st.booleans()), min_size=1, max_size=5))
def test_load_of_save_round_trips_unicode(tmp_path, rows):
    pairs = [EditedPair(p, c if has_chosen else None, r, f"id{i}", {"lang": p}, edited=e,
                        edit_meta={"who": c}, gold_spans=[(0, len(r))])
             for i, (p, c, r, e, has_chosen) in enumerate(rows) if e != r]
    prefs = [PreferencePair(p, c, r, f"id{i}", {}) for i, (p, c, r, _, _) in enumerate(rows) if c != r]
    if pairs:
        save_pairs(tmp_path / "edits.jsonl", pairs)
        assert load_pairs(tmp_path / "edits.jsonl", "edit") == pairs
    if prefs:
        save_pairs(tmp_path / "prefs.jsonl.gz", prefs)
        assert load_pairs(tmp_path / "prefs.jsonl.gz") == prefs
