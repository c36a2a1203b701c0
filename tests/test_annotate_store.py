"""`finegrain annotate`'s database and queues: tokens, assignment rule, durability settings, concurrency."""
from __future__ import annotations

import sqlite3
import threading

import pytest

from finegrain.annotate import auth
from finegrain.annotate import store as db
from finegrain.annotate.answers import build_answer
from finegrain.annotate.inputs import Item
from finegrain.annotate.queue import current_item, remaining_pairs, screening_every
from finegrain.errors import ConfigError, InputError


def items(n: int, kind: str = "pair", prefix: str = "p") -> list[Item]:
    return [Item(f"{prefix}{i}", f"prompt {i}", f"good answer {i}", f"bad answer number {i} here", kind=kind,
                 expected={"nothing_to_fix": True} if kind == "screening" else None) for i in range(n)]


@pytest.fixture
def store(tmp_path):
    s = db.Store(tmp_path / "a.sqlite", create=True)
    with s.connect() as conn:
        db.sync_items(conn, items(5), "pairs.jsonl")
    return s


def names(store, *who: str) -> dict[str, int]:
    out = {}
    with store.connect() as conn:
        for name in who:
            token = db.add_annotator(conn, name)
            out[name] = db.annotator_for_token(conn, token).annotator_id
    return out


def answer(conn, annotator_id: int, item_id: int, action: str = "submit") -> bool:
    t = db.task(conn, annotator_id, item_id)
    a = build_answer({"action": action, "text": t["rejected"].replace("bad", "good")}, original=t["rejected"],
                     prefill=None, error_types=["inaccurate"], guidelines_version="v", wall_s=10)
    return db.record_answer(conn, annotator_id, item_id, a, ("open",))


def test_durability_settings_of_every_connection(store):
    with store.connect() as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == db.BUSY_TIMEOUT_MS


def test_tokens_are_stored_only_as_hashes_and_checked(store, tmp_path):
    with store.connect() as conn:
        token = db.add_annotator(conn, "alice")
        who = db.annotator_for_token(conn, token)
        assert who.name == "alice" and not who.is_admin and who.token_hash == auth.hash_token(token)
        assert db.annotator_for_token(conn, token[:-1] + ("A" if token[-1] != "A" else "B")) is None
        assert db.annotator_for_token(conn, "1.short") is None and db.annotator_for_token(conn, "") is None
        assert db.annotator_for_token(conn, "999." + "x" * 43) is None
        with pytest.raises(ConfigError, match="already exists: pass --new-token"):
            db.add_annotator(conn, "alice")
        fresh = db.add_annotator(conn, "alice", new_token=True)
        assert db.annotator_for_token(conn, token) is None and db.annotator_for_token(conn, fresh).name == "alice"
        with pytest.raises(ConfigError, match="no annotator 'bob'"):
            db.add_annotator(conn, "bob", new_token=True)
        with pytest.raises(ConfigError, match="control or invisible"):
            db.add_annotator(conn, "eve\x00")
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("a.sqlite*"))
    assert token.encode() not in raw and fresh.encode() not in raw
    assert auth.hash_token(fresh).encode() in raw


def test_first_admin_is_made_once(store):
    with store.connect() as conn:
        token = db.ensure_admin(conn)
        assert db.annotator_for_token(conn, token).is_admin
        assert db.ensure_admin(conn) is None


def test_overlap_each_pair_at_most_k_and_each_annotator_at_most_once(store):
    ids = names(store, "a", "b", "c")
    seen: dict[int, list[int]] = {}
    with store.connect() as conn:
        for _ in range(5):
            for name in ("a", "b", "c"):
                item_id = current_item(conn, ids[name], overlap=2, every=0)
                if item_id is None:
                    continue
                seen.setdefault(ids[name], []).append(item_id)
                assert answer(conn, ids[name], item_id)
        for name in ids.values():
            assert current_item(conn, name, 2, 0) is None
    # 5 pairs x 2 annotators = 10 tasks; nobody twice on a pair; pairs filled in order
    assert sum(len(v) for v in seen.values()) == 10
    assert all(len(v) == len(set(v)) for v in seen.values())
    counts = {i: sum(i in v for v in seen.values()) for i in range(1, 6)}
    assert counts == {i: 2 for i in range(1, 6)}
    assert seen[ids["a"]][:2] == [1, 2] and seen[ids["b"]][0] == 1 and seen[ids["c"]][0] == 2


def test_open_task_resumes_after_reopening_the_database(store, tmp_path):
    ids = names(store, "a")
    with store.connect() as conn:
        first = current_item(conn, ids["a"], 1, 0)
        assert current_item(conn, ids["a"], 1, 0) == first  # the same item until answered
        db.save_draft(conn, ids["a"], first, "draft text", [], None, 3.0)
    again = db.Store(tmp_path / "a.sqlite")
    with again.connect() as conn:
        assert current_item(conn, ids["a"], 1, 0) == first
        assert db.draft(conn, ids["a"], first)["text"] == "draft text"
        assert answer(conn, ids["a"], first)
        assert db.draft(conn, ids["a"], first) is None  # the answer's transaction dropped the draft
        assert current_item(conn, ids["a"], 1, 0) == first + 1


def test_skip_gives_the_slot_back_and_a_flag_takes_the_pair_out(store):
    ids = names(store, "a", "b", "c")
    with store.connect() as conn:
        assert current_item(conn, ids["a"], 1, 0) == 1
        assert answer(conn, ids["a"], 1, "skip")
        assert current_item(conn, ids["b"], 1, 0) == 1  # a skipped it: it goes to someone else
        assert current_item(conn, ids["a"], 1, 0) == 2  # and never back to a
        assert answer(conn, ids["a"], 2, "flag")
        assert answer(conn, ids["b"], 1)
        assert current_item(conn, ids["c"], 3, 0) == 1  # overlap 3: pair 1 still open to c
        assert answer(conn, ids["c"], 1)
        assert current_item(conn, ids["c"], 3, 0) == 3  # pair 2 is flagged: out of every queue
        assert remaining_pairs(conn, ids["b"], 3) == 3  # pairs 3, 4, 5 (2 is flagged)


def test_screening_items_are_mixed_in_every_n(store):
    with store.connect() as conn:
        db.sync_items(conn, items(2, "screening", prefix="s"), "screening.jsonl")
    ids = names(store, "a")
    every = screening_every(0.34)
    assert every == 3 and screening_every(0) == 0
    kinds = []
    with store.connect() as conn:
        while (item_id := current_item(conn, ids["a"], 1, every)) is not None:
            kinds.append(db.item(conn, item_id)["kind"])
            assert answer(conn, ids["a"], item_id, "nothing")
    assert kinds == ["pair", "pair", "screening", "pair", "pair", "screening", "pair"]


def test_an_id_whose_text_changed_is_refused(store):
    changed = items(5)
    changed[2].rejected = "a different response"
    with store.connect() as conn, pytest.raises(InputError, match=r"pairs.jsonl: id 'p2': field 'rejected': differs"):
        db.sync_items(conn, changed, "pairs.jsonl")
    grown = items(7)
    with store.connect() as conn:
        assert db.sync_items(conn, grown, "pairs.jsonl") == {"added": 2, "kept": 5}


def test_concurrent_assignments_and_answers_lose_nothing(store):
    """Eight annotators at once, overlap 1: no pair twice; every answer lands."""
    ids = list(names(store, *[f"n{i}" for i in range(8)]).values())
    barrier = threading.Barrier(len(ids))
    got: dict[int, int | None] = {}
    errors: list[BaseException] = []

    def work(annotator_id: int) -> None:
        try:
            with store.connect() as conn:
                barrier.wait()
                got[annotator_id] = item_id = current_item(conn, annotator_id, 1, 0)
                barrier.wait()
                if item_id is not None:
                    assert answer(conn, annotator_id, item_id)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assigned = [v for v in got.values() if v is not None]
    assert sorted(assigned) == [1, 2, 3, 4, 5]  # five pairs, five annotators got one each
    with store.connect() as conn:
        assert conn.execute("SELECT COUNT(*) FROM tasks WHERE status = 'submit'").fetchone()[0] == 5
        assert conn.execute("SELECT COUNT(*) FROM submissions").fetchone()[0] == 5


def test_not_an_annotation_database(tmp_path):
    bad = tmp_path / "x.sqlite"
    bad.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(InputError, match="not an annotation database"):
        db.Store(bad)
    with pytest.raises(InputError, match="no such annotation database: start `finegrain annotate serve"):
        db.Store(tmp_path / "missing.sqlite")


def test_answer_twice_is_refused_as_stale(store):
    ids = names(store, "a")
    with store.connect() as conn:
        item_id = current_item(conn, ids["a"], 1, 0)
        assert answer(conn, ids["a"], item_id)
        assert not answer(conn, ids["a"], item_id)  # only 'open' allowed: nothing written
        assert conn.execute("SELECT COUNT(*) FROM submissions").fetchone()[0] == 1
        assert isinstance(conn, sqlite3.Connection)


def test_screening_answers_are_scored_per_annotator(tmp_path):
    from finegrain.annotate.report import admin_report

    store = db.Store(tmp_path / "s.sqlite", create=True)
    screening = [Item("s-fine", "p", None, "Red is a primary colour.", kind="screening",
                      expected={"nothing_to_fix": True}),
                 Item("s-flaw", "p", None, "Water boils at 90 degrees.", kind="screening",
                      expected={"nothing_to_fix": False, "edited": "Water boils at 100 degrees.", "gold_spans": []})]
    with store.connect() as conn:
        db.sync_items(conn, items(4), "pairs.jsonl")
        db.sync_items(conn, screening, "screening.jsonl")
    ids = names(store, "good", "bad")
    every = 2
    with store.connect() as conn:
        for name, careful in (("good", True), ("bad", False)):
            while (item_id := current_item(conn, ids[name], 2, every)) is not None:
                t = db.task(conn, ids[name], item_id)
                if t["pair_id"] == "s-flaw" and careful:
                    payload = {"action": "submit", "text": "Water boils at 100 degrees."}
                elif t["pair_id"] == "s-fine" and not careful:
                    payload = {"action": "submit", "text": "Blue is a primary colour."}
                else:
                    payload = {"action": "nothing"}
                a = build_answer(payload, original=t["rejected"], prefill=None, error_types=["x"],
                                 guidelines_version="v", wall_s=1)
                assert db.record_answer(conn, ids[name], item_id, a, ("open",))
        report = admin_report(conn, overlap=2, max_edit_ratio=0.75)
    rows = {r["name"]: r for r in report["annotators"]}
    assert (rows["good"]["screening_passed"], rows["good"]["screening_total"]) == (2, 2)
    assert (rows["bad"]["screening_passed"], rows["bad"]["screening_total"]) == (0, 2)
    assert rows["good"]["nothing"] == 5 and rows["good"]["agreement_with_others"] == 1.0  # both: nothing on pairs
    assert report["overview"]["pairs_complete"] == 4 and report["overview"]["screening_items"] == 2


def test_the_admin_plot_draws_names_holding_dollar_signs(store):
    """An annotator name is text, never matplotlib TeX: "$\\frac$" must not break /admin/plot.png."""
    from finegrain.annotate.report import admin_report, plot_png

    ids = names(store, "a$\\frac$", "cost $5 $6")
    with store.connect() as conn:
        for who in ids.values():
            assert answer(conn, who, current_item(conn, who, 2, 0))
        report = admin_report(conn, overlap=2, max_edit_ratio=0.75)
    assert plot_png(report)[:8] == b"\x89PNG\r\n\x1a\n"


def revise(conn, annotator_id: int, item_id: int, text: str) -> bool:
    """Change an answered task's answer, as the app posts a revision."""
    t = db.task(conn, annotator_id, item_id)
    a = build_answer({"action": "submit", "text": text}, original=t["rejected"], prefill=None,
                     error_types=["inaccurate"], guidelines_version="v", wall_s=10)
    return db.record_answer(conn, annotator_id, item_id, a, ("open", "submit", "nothing", "flag"))


def test_the_revision_cap_is_enforced_by_the_update_itself(store):
    """Two posts (two tabs, two servers) can both pass the app's check on a row read earlier: the UPDATE
    must refuse the one past the cap, with a clear error, and write nothing."""
    ids = names(store, "a")
    with store.connect() as conn:
        item_id = current_item(conn, ids["a"], 1, 0)
        assert answer(conn, ids["a"], item_id)
        with db.write(conn):
            conn.execute("UPDATE tasks SET revisions = ? WHERE annotator_id = ? AND item_id = ?",
                         (db.MAX_REVISIONS - 1, ids["a"], item_id))
        checked = db.task(conn, ids["a"], item_id)  # what both racing posts read before writing
        assert checked["revisions"] < db.MAX_REVISIONS
        assert revise(conn, ids["a"], item_id, "good answer number 0 here, first tab")
        with pytest.raises(db.RevisionLimitError, match=f"at most {db.MAX_REVISIONS} times"):
            revise(conn, ids["a"], item_id, "good answer number 0 here, second tab")
        t = db.task(conn, ids["a"], item_id)
        assert t["revisions"] == db.MAX_REVISIONS and t["edited"].endswith("first tab")
        assert conn.execute("SELECT COUNT(*) FROM submissions").fetchone()[0] == 2
        assert not answer(conn, ids["a"], item_id)  # a status no longer allowed is still just stale


def test_a_draft_from_before_an_answer_is_not_stored(store):
    """A draft posted from a page opened before the answer (in flight, another tab) must not outlive it;
    a draft of a revision, from a page opened after the answer, is stored."""
    ids = names(store, "a")
    with store.connect() as conn:
        item_id = current_item(conn, ids["a"], 1, 0)
        opened = db.task_version(db.task(conn, ids["a"], item_id))
        assert opened == 0
        assert db.save_draft(conn, ids["a"], item_id, "early draft", [], None, 1.0, opened) is not None
        assert answer(conn, ids["a"], item_id)
        assert db.save_draft(conn, ids["a"], item_id, "late draft", [], None, 2.0, opened) is None
        assert db.draft(conn, ids["a"], item_id) is None
        reopened = db.task_version(db.task(conn, ids["a"], item_id))
        assert reopened == 1
        assert db.save_draft(conn, ids["a"], item_id, "revision draft", [], None, 3.0, reopened) is not None
        assert db.draft(conn, ids["a"], item_id)["text"] == "revision draft"
        assert revise(conn, ids["a"], item_id, "good answer number 0 here, revised")
        assert db.task_version(db.task(conn, ids["a"], item_id)) == 2  # every answer moves it on, revisions too
        assert db.save_draft(conn, ids["a"], item_id, "late again", [], None, 4.0, reopened) is None
        assert db.draft(conn, ids["a"], item_id) is None


def test_each_database_has_a_random_id_kept_across_openings(store, tmp_path):
    """Pages key their unsent drafts by it: two databases served one after the other at one origin must differ."""
    with store.connect() as conn:
        first = db.get_meta(conn, "db_id")
    assert first
    with db.Store(tmp_path / "a.sqlite").connect() as conn:
        assert db.get_meta(conn, "db_id") == first
    with db.Store(tmp_path / "b.sqlite", create=True).connect() as conn:
        assert db.get_meta(conn, "db_id") not in (None, first)
    with store.connect() as conn, db.write(conn):  # a database made before the id existed
        conn.execute("DELETE FROM meta WHERE key = 'db_id'")
    with db.Store(tmp_path / "a.sqlite").connect() as conn:
        given = db.get_meta(conn, "db_id")
    with db.Store(tmp_path / "a.sqlite").connect() as conn:
        assert given and db.get_meta(conn, "db_id") == given
