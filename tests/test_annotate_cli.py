"""`finegrain annotate` on the command line: one-line errors, add-annotator, export, and the export
read back by `finegrain edit --backend file`."""
from __future__ import annotations

import argparse
import builtins
import json

import pytest
from annotate_support import PAIRS, write_pairs

from finegrain.annotate import store as db
from finegrain.annotate.answers import build_answer
from finegrain.annotate.cli import configure
from finegrain.annotate.config import ServeConfig, edit_max_ratio_default
from finegrain.annotate.queue import current_item
from finegrain.annotate.server import prepare
from finegrain.cli import main
from finegrain.config import build_config, config_from_args
from finegrain.edit.core import EditConfig


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(capsys, *argv: str) -> str:
    code, _, err = run_cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    return lines[0]


def test_threshold_is_finegrain_edits_default():
    import dataclasses

    edit_default = next(f.default for f in dataclasses.fields(EditConfig) if f.name == "max_edit_ratio")
    assert edit_max_ratio_default() == edit_default
    serve_default = next(f.default for f in dataclasses.fields(ServeConfig) if f.name == "max_edit_ratio")
    assert serve_default == edit_default


@pytest.mark.parametrize("option, content, expected", [
    ("--data", '{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": "p", "chosen": "c", "rejected": 5}\n',
     "pairs.jsonl: line 2: field 'rejected': must be a string, got int"),
    ("--prefill", '{"id": "pan", "prompt": "p", "rejected": "another response", "edited": "x"}\n',
     "in.jsonl: line 1: field 'rejected': differs from the 'rejected' of pair 'pan'"),
    ("--prefill", '{"id": "pan", "prompt": "p", "rejected": "r"}\n',
     "in.jsonl: line 1: field 'edited': missing"),
    ("--prefill", '{"id": "nope", "prompt": "p", "rejected": "r", "edited": "e"}\n',
     "in.jsonl: no pre-edit matches a pair of the pairs file by id"),
    ("--screening", '{"id": "s1", "prompt": "p", "rejected": "r"}\n',
     "in.jsonl: line 1: field 'expected': a screening item needs a known answer"),
    ("--screening", '{"id": "pan", "prompt": "p", "rejected": "r", "expected": "nothing_to_fix"}\n',
     "in.jsonl: line 1: field 'id': 'pan' is also the id of a pair"),
    ("--screening", '{"prompt": "p", "rejected": "r", "gold_spans": [[0, 9]]}\n',
     "in.jsonl: line 1: field 'gold_spans': span 0 [0, 9] is outside the text 'rejected'"),
    ("--screening", '{"prompt": "p", "rejected": "r", "expected": "fine"}\n',
     "in.jsonl: line 1: field 'expected': must be \"nothing_to_fix\""),
])
def test_serve_refuses_bad_input_with_one_line(tmp_path, capsys, option, content, expected):
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    bad = tmp_path / ("pairs.jsonl" if option == "--data" else "in.jsonl")
    bad.write_text(content)
    argv = ["annotate", "serve", "--data", str(pairs), "--db", str(tmp_path / "a.sqlite")]
    if option != "--data":
        argv += [option, str(bad)]
    line = one_error_line(capsys, *argv)
    assert line.startswith("finegrain annotate: error: ") and expected in line, line


def test_serve_refuses_bad_options(tmp_path, capsys):
    pairs = str(write_pairs(tmp_path / "pairs.jsonl"))
    db_path = str(tmp_path / "a.sqlite")
    assert "no guidelines 'nope'" in one_error_line(capsys, "annotate", "serve", "--data", pairs, "--db", db_path,
                                                      "--guidelines", "nope")
    assert "--overlap must be at least 1" in one_error_line(capsys, "annotate", "serve", "--data", pairs, "--db",
                                                            db_path, "--overlap", "0")
    assert "no such file" in one_error_line(capsys, "annotate", "serve", "--data", str(tmp_path / "x.jsonl"),
                                            "--db", db_path)


def test_serve_refuses_a_db_it_cannot_create_with_one_line(tmp_path, capsys):
    pairs = str(write_pairs(tmp_path / "pairs.jsonl"))
    (tmp_path / "afile").write_text("x")
    line = one_error_line(capsys, "annotate", "serve", "--data", pairs, "--db", str(tmp_path / "afile" / "a.sqlite"))
    assert "a.sqlite: --db cannot be written: " in line and "afile is a file, not a directory" in line, line
    line = one_error_line(capsys, "annotate", "serve", "--data", pairs, "--db", str(tmp_path))
    assert "--db cannot be written: it is a directory, not a file" in line, line


def test_serve_options_from_a_yaml_file(tmp_path):
    pairs, db_path = write_pairs(tmp_path / "p.jsonl"), tmp_path / "new" / "a.sqlite"
    (tmp_path / "annotate.yaml").write_text(f"data: {pairs}\ndb: {db_path}\noverlap: 3\nerror-types: [wrong, rude]\n")
    parser = argparse.ArgumentParser()
    configure(parser)
    args = parser.parse_args(["serve", "--config", str(tmp_path / "annotate.yaml"), "--port", "8200"])
    cfg = config_from_args(ServeConfig, args)
    assert (cfg.overlap, cfg.error_types, cfg.port, cfg.host) == (3, ["wrong", "rude"], 8200, "127.0.0.1")
    summary = prepare(cfg).summary  # the database's folder is created
    assert summary["pairs_added"] == len(PAIRS) and summary["url"] == "http://127.0.0.1:8200"
    assert "admin_login_url" in summary and "admin_login_url" not in prepare(cfg).summary


def test_serve_without_the_web_extra_names_it(tmp_path, capsys, monkeypatch):
    real_import = builtins.__import__

    def no_starlette(name, *args, **kwargs):
        if name.split(".")[0] in ("starlette", "uvicorn"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_starlette)
    line = one_error_line(capsys, "annotate", "serve", "--data", str(write_pairs(tmp_path / "p.jsonl")), "--db",
                          str(tmp_path / "a.sqlite"))
    assert "finegrain[annotate]" in line and "starlette" in line
    assert not (tmp_path / "a.sqlite").exists()  # refused before touching anything
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "annotate" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["annotate", "add-annotator", "--help"])  # the actions without a web stack still parse
    assert "--new-token" in capsys.readouterr().out


def test_add_annotator_prints_a_link_once_and_stores_a_hash(tmp_path, capsys):
    db_path = tmp_path / "a.sqlite"
    line = one_error_line(capsys, "annotate", "add-annotator", "alice", "--db", str(db_path))
    assert "no such annotation database: start `finegrain annotate serve" in line
    prepare(build_config(ServeConfig, dict(data=str(write_pairs(tmp_path / "p.jsonl")), db=str(db_path),
                                           port=8123)))
    code, out, _ = run_cli(capsys, "annotate", "add-annotator", "alice", "--db", str(db_path))
    info = json.loads(out)
    assert code == 0 and info["name"] == "alice" and not info["admin"]
    assert info["login_url"].startswith("http://127.0.0.1:8123/login#token=")
    token = info["login_url"].split("#token=")[1]
    with db.Store(db_path).connect() as conn:
        assert db.annotator_for_token(conn, token).name == "alice"
        assert token not in json.dumps([dict(r) for r in conn.execute("SELECT * FROM annotators")])
    assert "already exists" in one_error_line(capsys, "annotate", "add-annotator", "alice", "--db", str(db_path))
    code, out, _ = run_cli(capsys, "annotate", "add-annotator", "--name", "root", "--admin", "--db", str(db_path),
                           "--public-url", "https://annotate.example.org")
    assert json.loads(out)["admin"] and json.loads(out)["login_url"].startswith("https://annotate.example.org/login#")


def annotate(db_path, who: str, plan: dict[str, tuple], overlap: int = 2, prefill: dict | None = None) -> None:
    """Answer ``who``'s queue: ``plan[pair_id] = (action, edit function, spans)``."""
    store = db.Store(db_path)
    with store.connect() as conn:
        token = db.add_annotator(conn, who)
        me = db.annotator_for_token(conn, token).annotator_id
        while (item_id := current_item(conn, me, overlap, 0)) is not None:
            t = db.task(conn, me, item_id)
            action, fn, spans = plan.get(t["pair_id"], ("nothing", None, []))
            payload = {"action": action, "text": fn(t["prefill"] or t["rejected"]) if fn else None, "spans": spans,
                       "active_s": 5.0, "note": f"{who} on {t['pair_id']}"}
            a = build_answer(payload, original=t["rejected"], prefill=t["prefill"],
                             error_types=["unsafe", "inaccurate"], guidelines_version="minimal_edit_v1", wall_s=60.0)
            assert db.record_answer(conn, me, item_id, a, ("open",))


def test_export_and_edit_backend_file_read_it(tmp_path, capsys):
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    prefill = tmp_path / "llm.jsonl"
    pan = PAIRS[0]
    llm_edit = pan["rejected"].replace("Soak it in bleach overnight", "Rinse it with hot water")
    prefill.write_text(json.dumps(dict(pan, edited=llm_edit, edit_meta={"backend": "anthropic", "model": "claude-x",
                                                                        "prompt_version": "minimal_edit_v1"})) + "\n")
    db_path = tmp_path / "a.sqlite"
    prepare(build_config(ServeConfig, dict(data=str(pairs), db=str(db_path), overlap=2, prefill=str(prefill))))
    at = PAIRS[1]["rejected"].index("9,849")
    fix_height = ("submit", lambda t: t.replace("9,849", "8,849"), [[at, at + 5, "inaccurate"]])
    annotate(db_path, "alice", {"pan": ("submit", lambda t: t, [[8, 27, "unsafe"]]), "everest": fix_height,
                                "paris": ("submit", lambda t: t.replace("Lyon", "Paris"), [])})
    annotate(db_path, "bob", {"pan": ("submit", lambda t: t.replace("steel wool", "a brush"), []),
                              "everest": fix_height, "tea": ("flag", None, [])})
    out = tmp_path / "human_edits.jsonl"
    code, stdout, _ = run_cli(capsys, "annotate", "export", "--db", str(db_path), "--output", str(out))
    summary = json.loads(stdout)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert code == 0 and summary["n_rows"] == 3 == len(rows) and summary["answers"]["flag"] == 1
    by_id = {r["id"]: r for r in rows}
    assert list(by_id) == ["pan", "everest", "paris"]  # queue order, one edit per pair
    assert by_id["pan"]["annotator"] == "alice" and by_id["pan"]["edited"] == llm_edit  # consensus tie: first
    meta = by_id["pan"]["edit_meta"]
    assert meta["prefill_used"] and meta["prefill_model"] == "claude-x" and meta["prefill_changed"] is False
    assert meta["prefill_edit_ratio"] == 0.0 and meta["prefill_ratio_to_original"] > 0
    assert meta["n_edits_for_pair"] == 2 and meta["agreement"] == round(4 / 6, 6)
    assert meta["guidelines_version"] == "minimal_edit_v1"
    assert meta["time_spent_s"] == 5.0 and meta["wall_time_s"] >= 0 and meta["error_spans"][0]["type"] == "unsafe"
    assert by_id["pan"]["gold_spans"] == [[8, 27]]
    assert by_id["everest"]["edit_meta"]["agreement"] == 1.0
    assert by_id["everest"]["edit_meta"]["prefill_used"] is False
    code, stdout, _ = run_cli(capsys, "annotate", "export", "--db", str(db_path), "--output", str(out),
                              "--select", "all")
    assert json.loads(stdout)["n_rows"] == 5 and json.loads(stdout)["n_pairs"] == 3
    code, stdout, _ = run_cli(capsys, "annotate", "export", "--db", str(db_path), "--output", str(out),
                              "--select", "all", "--annotator", "bob")
    assert [json.loads(x)["annotator"] for x in out.read_text().splitlines()] == ["bob", "bob"]
    assert "no annotator 'carol'" in one_error_line(capsys, "annotate", "export", "--db", str(db_path), "--output",
                                                      str(out), "--annotator", "carol")
    # the consensus export is what `finegrain edit --backend file` reads
    run_cli(capsys, "annotate", "export", "--db", str(db_path), "--output", str(out))
    edited = tmp_path / "edited.jsonl"
    code, stdout, err = run_cli(capsys, "edit", "--backend", "file", "--model", str(out), "--data", str(pairs),
                                "--output", str(edited))
    assert code == 0, err
    got = {r["id"]: r for r in map(json.loads, edited.read_text().splitlines())}
    assert set(got) == {"pan", "everest", "paris"}
    assert got["everest"]["gold_spans"] == [[at, at + 5]] and got["everest"]["rejected"][at:at + 5] == "9,849"
    em = got["pan"]["edit_meta"]
    assert em["backend"] == "file" and em["annotator"] == "alice" and em["prefill_model"] == "claude-x"
    assert em["tool"] == "finegrain annotate" and em["notes"] == "alice on pan"


def test_human_edits_file_checks_the_new_optional_fields(tmp_path, capsys):
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    human = tmp_path / "human.jsonl"
    edit = PAIRS[3]["rejected"].replace("Lyon", "Paris")
    cases = [({"gold_spans": [[5, 2]]}, "line 1: field 'gold_spans': span 0 [5, 2] is empty or reversed"),
             ({"gold_spans": "0-4"}, "line 1: field 'gold_spans': must be a list"),
             ({"edit_meta": [1]}, "line 1: field 'edit_meta': must be an object"),
             ({"gold_spans": [[0, 900]]}, "line 1: field 'gold_spans': span [0, 900] is outside the rejected "
                                          "response of pair 'paris'")]
    for extra, expected in cases:
        human.write_text(json.dumps({"id": "paris", "edited": edit, **extra}) + "\n")
        line = one_error_line(capsys, "edit", "--backend", "file", "--model", str(human), "--data", str(pairs),
                              "--output", str(tmp_path / "e.jsonl"))
        assert expected in line, line
    human.write_text(json.dumps({"id": "paris", "edited": edit, "gold_spans": [[25, 29], [27, 30]],
                                 "edit_meta": {"backend": "spoofed", "time_spent_s": 3}}) + "\n")
    code, _, err = run_cli(capsys, "edit", "--backend", "file", "--model", str(human), "--data", str(pairs),
                           "--output", str(tmp_path / "e.jsonl"))
    row = json.loads((tmp_path / "e.jsonl").read_text())
    assert code == 0 and row["gold_spans"] == [[25, 30]]  # overlaps merged
    assert row["edit_meta"]["backend"] == "file" and row["edit_meta"]["time_spent_s"] == 3


def test_export_gets_the_permissions_of_any_file_the_user_writes(tmp_path, capsys):
    """The export is written atomically (a temporary file renamed), yet not left private (mkstemp's 0600): the umask
    applies to a new file, and a file written over keeps its permissions, as with open(path, "w")."""
    import os
    import stat

    db_path = tmp_path / "a.sqlite"
    prepare(build_config(ServeConfig, dict(data=str(write_pairs(tmp_path / "pairs.jsonl")), db=str(db_path))))
    annotate(db_path, "alice", {"paris": ("submit", lambda t: t.replace("Lyon", "Paris"), [])}, overlap=1)
    out = tmp_path / "human_edits.jsonl"
    old = os.umask(0o022)
    try:
        code, _, err = run_cli(capsys, "annotate", "export", "--db", str(db_path), "--output", str(out))
        assert code == 0, err
        assert stat.S_IMODE(out.stat().st_mode) == 0o644
        out.chmod(0o664)
        code, _, err = run_cli(capsys, "annotate", "export", "--db", str(db_path), "--output", str(out))
        assert code == 0, err
        assert stat.S_IMODE(out.stat().st_mode) == 0o664
    finally:
        os.umask(old)
    assert json.loads(out.read_text())["id"] == "paris"


def test_consensus_tie_goes_to_the_first_submitted_even_after_it_is_revised(tmp_path, capsys):
    """Two edits of a pair always tie: the export takes the one submitted first, and a later revision of it (a typo
    fixed) keeps its place rather than handing the pair to the other annotator."""
    db_path = tmp_path / "a.sqlite"
    prepare(build_config(ServeConfig, dict(data=str(write_pairs(tmp_path / "pairs.jsonl")), db=str(db_path),
                                           overlap=2)))
    annotate(db_path, "alice", {"paris": ("submit", lambda t: t.replace("Lyon", "Pariss"), [])})
    annotate(db_path, "bob", {"paris": ("submit", lambda t: t.replace("Lyon", "Paris"), [])})
    with db.Store(db_path).connect() as conn:
        me = conn.execute("SELECT annotator_id FROM annotators WHERE name = 'alice'").fetchone()[0]
        item_id = conn.execute("SELECT item_id FROM items WHERE pair_id = 'paris'").fetchone()[0]
        original = db.task(conn, me, item_id)["rejected"]
        a = build_answer({"action": "submit", "text": original.replace("Lyon", "Paris")}, original=original,
                         prefill=None, error_types=["unsafe"], guidelines_version="minimal_edit_v1", wall_s=60.0)
        assert db.record_answer(conn, me, item_id, a, ("submit",))
    out = tmp_path / "human_edits.jsonl"
    code, _, err = run_cli(capsys, "annotate", "export", "--db", str(db_path), "--output", str(out))
    assert code == 0, err
    row = next(r for r in map(json.loads, out.read_text().splitlines()) if r["id"] == "paris")
    assert row["annotator"] == "alice" and row["edit_meta"]["revisions"] == 1
