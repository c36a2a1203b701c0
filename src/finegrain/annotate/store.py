"""The annotation database: one SQLite file holds the items, annotators, queues, drafts and answers.

Durability: the database runs in WAL mode with ``synchronous=FULL``: every commit is fsynced
to the write-ahead log before the server answers, so a submission the page reported as saved
survives a SIGKILL of the server and a power cut (NORMAL would survive a killed process but
could lose the last commits on power loss; submissions are a few a minute, so the fsync costs
nothing that matters). Each write is ONE transaction opened with ``BEGIN IMMEDIATE`` (the
write lock is taken at the start, so two writers queue on ``busy_timeout`` instead of failing
with "database is locked" half-way), and a submission updates the task, appends to the
``submissions`` log and drops the draft in that one transaction. Several processes may use the
file at once (the server, ``add-annotator``, ``export``).

Tables:

- ``meta``: key/value settings (schema version, the CSRF key, the database's random id, the login-link
  base URL, ...);
- ``items``: the pairs and screening items, in queue order (``item_id``), with their pre-edits;
- ``annotators``: names, sha256 hashes of the login tokens, the admin flag;
- ``tasks``: one row per (annotator, item) the annotator was given, with its ``status``
  (``open``, ``submit``, ``nothing``, ``skip``, ``flag``) and the latest answer;
- ``drafts``: the autosaved text and spans of an unfinished task;
- ``submissions``: every answer ever given, revisions included (append-only).
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import sqlite3
import time
import unicodedata
from dataclasses import dataclass
from typing import Any, Iterator

from ..errors import ConfigError, InputError
from ..io import check_output_file
from . import auth
from .inputs import Item

SCHEMA_VERSION = "1"
BUSY_TIMEOUT_MS = 15000
STATUSES = ("open", "submit", "nothing", "skip", "flag")
ANSWERS = ("submit", "nothing", "skip", "flag")
MAX_REVISIONS = 50  # changes of one answer: the submissions log keeps every version, so it is bounded

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    item_id INTEGER PRIMARY KEY AUTOINCREMENT,
    pair_id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL CHECK (kind IN ('pair', 'screening')),
    prompt TEXT NOT NULL,
    chosen TEXT,
    rejected TEXT NOT NULL,
    prefill TEXT,
    prefill_meta TEXT,
    expected TEXT,
    added_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS annotators (
    annotator_id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    token_hash TEXT NOT NULL,
    is_admin INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    session_hash TEXT PRIMARY KEY,
    annotator_id INTEGER NOT NULL REFERENCES annotators (annotator_id),
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tasks (
    annotator_id INTEGER NOT NULL REFERENCES annotators (annotator_id),
    item_id INTEGER NOT NULL REFERENCES items (item_id),
    seq INTEGER NOT NULL,
    status TEXT NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'submit', 'nothing', 'skip', 'flag')),
    assigned_at REAL NOT NULL,
    answered_at REAL,
    edited TEXT,
    spans TEXT NOT NULL DEFAULT '[]',
    note TEXT,
    flag_reason TEXT,
    active_s REAL NOT NULL DEFAULT 0,
    edit_ratio REAL,
    stats TEXT,
    prefill TEXT,
    guidelines_version TEXT,
    revisions INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (annotator_id, item_id),
    UNIQUE (annotator_id, seq)
);
CREATE INDEX IF NOT EXISTS tasks_by_item ON tasks (item_id, status);
CREATE TABLE IF NOT EXISTS drafts (
    annotator_id INTEGER NOT NULL,
    item_id INTEGER NOT NULL,
    text TEXT NOT NULL,
    spans TEXT NOT NULL,
    note TEXT,
    active_s REAL NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (annotator_id, item_id)
);
CREATE TABLE IF NOT EXISTS submissions (
    submission_id INTEGER PRIMARY KEY AUTOINCREMENT,
    annotator_id INTEGER NOT NULL,
    item_id INTEGER NOT NULL,
    action TEXT NOT NULL,
    edited TEXT,
    spans TEXT NOT NULL,
    note TEXT,
    flag_reason TEXT,
    active_s REAL NOT NULL,
    edit_ratio REAL,
    at REAL NOT NULL
);
"""


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


@contextlib.contextmanager
def write(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction: ``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on any error)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class Store:
    """The database at ``path``; ``with store.connect() as conn`` gives a connection for one request."""

    def __init__(self, path: str | os.PathLike, *, create: bool = False):
        self.path = str(path)
        if not create and not os.path.exists(self.path):
            raise InputError("no such annotation database: start `finegrain annotate serve --data PAIRS --db "
                             f"{self.path}` once to create it", path=self.path)
        if create:
            check_output_file(self.path, "--db")  # a file where a folder should be: one line, not a traceback
            try:
                os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            except OSError as e:
                raise InputError(f"cannot create the database's folder ({e.strerror or e})", path=self.path) from e
        try:
            with self.connect() as conn:
                if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
                    raise ConfigError(f"{self.path}: SQLite could not switch to WAL mode (a network file system?)")
                conn.executescript(_SCHEMA)  # idempotent; executescript would commit an open transaction
                with write(conn):
                    version = get_meta(conn, "schema_version")
                    if version is None:
                        set_meta(conn, "schema_version", SCHEMA_VERSION)
                        set_meta(conn, "secret_key", auth.new_secret_key())
                        set_meta(conn, "created_at", str(time.time()))
                    elif version != SCHEMA_VERSION:
                        raise ConfigError(f"{self.path}: annotation database schema {version}, this finegrain "
                                          f"reads {SCHEMA_VERSION}")
                    if get_meta(conn, "db_id") is None:  # databases made before it existed get one on first open
                        set_meta(conn, "db_id", secrets.token_hex(8))
        except sqlite3.OperationalError as e:
            raise InputError(f"cannot open the database ({e})", path=self.path) from e
        except sqlite3.DatabaseError as e:
            raise InputError(f"not an annotation database ({e})", path=self.path) from e

    @contextlib.contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        conn = _connect(self.path)
        try:
            yield conn
        finally:
            conn.close()


# ---------------------------------------------------------------- meta

def get_meta(conn: sqlite3.Connection, key: str, default: str | None = None) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return row[0] if row else default


def set_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                 (key, value))


def settings(conn: sqlite3.Connection) -> dict[str, Any]:
    """The serving settings the last ``serve`` stored (overlap, screening, guidelines, threshold ...)."""
    raw = get_meta(conn, "settings")
    return json.loads(raw) if raw else {}


# ---------------------------------------------------------------- items

_CONTENT = ("kind", "prompt", "chosen", "rejected")


def sync_items(conn: sqlite3.Connection, items: list[Item], source: str) -> dict[str, int]:
    """Insert new items (appended to the queue order), refresh pre-edits and expected answers of known
    ones; an id whose text changed is refused (its answers would be about another pair)."""
    added = kept = 0
    now = time.time()
    with write(conn):
        for it in items:
            row = conn.execute("SELECT * FROM items WHERE pair_id = ?", (it.pair_id,)).fetchone()
            prefill_meta = json.dumps(it.prefill_meta) if it.prefill_meta is not None else None
            expected = json.dumps(it.expected) if it.expected is not None else None
            if row is None:
                conn.execute("INSERT INTO items (pair_id, kind, prompt, chosen, rejected, prefill, prefill_meta, "
                             "expected, added_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             (it.pair_id, it.kind, it.prompt, it.chosen, it.rejected, it.prefill, prefill_meta,
                              expected, now))
                added += 1
                continue
            for name in _CONTENT:
                if row[name] != getattr(it, name):
                    raise InputError(f"differs from the {row['kind']} with id {it.pair_id!r} already in the "
                                     "database (an id must keep its text: give the new text a new id, or use a new "
                                     "--db)", path=source, record=it.location or f"id {it.pair_id!r}", field=name)
            conn.execute("UPDATE items SET prefill = ?, prefill_meta = ?, expected = ? WHERE item_id = ?",
                         (it.prefill, prefill_meta, expected, row["item_id"]))
            kept += 1
    return {"added": added, "kept": kept}


def item(conn: sqlite3.Connection, item_id: int) -> sqlite3.Row | None:
    return conn.execute("SELECT * FROM items WHERE item_id = ?", (item_id,)).fetchone()


# ---------------------------------------------------------------- annotators and tokens

@dataclass(frozen=True)
class Annotator:
    annotator_id: int
    name: str
    is_admin: bool
    token_hash: str


def check_name(name: str) -> str:
    """An annotator name: 1-64 printable characters, surrounding whitespace removed."""
    name = (name or "").strip()
    if not 1 <= len(name) <= 64:
        raise ConfigError("an annotator name needs 1 to 64 characters")
    if any(unicodedata.category(c).startswith("C") for c in name):
        raise ConfigError(f"annotator name {name!r} holds a control or invisible character")
    return name


def add_annotator(conn: sqlite3.Connection, name: str, *, admin: bool = False, new_token: bool = False) -> str:
    """Create annotator ``name`` (or, with ``new_token``, replace their token); returns the login token."""
    name = check_name(name)
    with write(conn):
        row = conn.execute("SELECT annotator_id FROM annotators WHERE name = ?", (name,)).fetchone()
        if row is not None and not new_token:
            raise ConfigError(f"annotator {name!r} already exists: pass --new-token to give them a new login link "
                              "(the old one stops working)")
        if row is None and new_token:
            raise ConfigError(f"no annotator {name!r} to give a new token (leave out --new-token to create one)")
        if row is None:
            cur = conn.execute("INSERT INTO annotators (name, token_hash, is_admin, created_at) VALUES (?, '', ?, ?)",
                               (name, int(admin), time.time()))
            annotator_id = cur.lastrowid
        else:
            annotator_id = row["annotator_id"]
            if admin:
                conn.execute("UPDATE annotators SET is_admin = 1 WHERE annotator_id = ?", (annotator_id,))
        token = auth.new_token(annotator_id)
        conn.execute("UPDATE annotators SET token_hash = ? WHERE annotator_id = ?",
                     (auth.hash_token(token), annotator_id))
        conn.execute("DELETE FROM sessions WHERE annotator_id = ?", (annotator_id,))  # the old link's logins end
    return token


def ensure_admin(conn: sqlite3.Connection, name: str = "admin") -> str | None:
    """A token for a new admin ``name`` when the database has no admin yet, else None."""
    if conn.execute("SELECT 1 FROM annotators WHERE is_admin = 1").fetchone():
        return None
    existing = conn.execute("SELECT 1 FROM annotators WHERE name = ?", (name,)).fetchone()
    return add_annotator(conn, name, admin=True, new_token=existing is not None)


def annotator_for_token(conn: sqlite3.Connection, token: str | None) -> Annotator | None:
    """The annotator a login token belongs to, or None (compared in constant time)."""
    if not token:
        return None
    annotator_id = auth.token_annotator_id(token)
    if annotator_id is None:
        return None
    row = conn.execute("SELECT * FROM annotators WHERE annotator_id = ?", (annotator_id,)).fetchone()
    if row is None or not row["token_hash"] or not auth.token_matches(token, row["token_hash"]):
        return None
    return Annotator(row["annotator_id"], row["name"], bool(row["is_admin"]), row["token_hash"])


def open_session(conn: sqlite3.Connection, annotator: Annotator, max_age: float) -> str:
    """A new login session of ``annotator`` lasting ``max_age`` seconds; returns its id (the cookie's value)."""
    session, now = auth.new_session_id(), time.time()
    with write(conn):
        conn.execute("DELETE FROM sessions WHERE expires_at <= ?", (now,))
        conn.execute("INSERT INTO sessions (session_hash, annotator_id, created_at, expires_at) VALUES (?, ?, ?, ?)",
                     (auth.hash_token(session), annotator.annotator_id, now, now + max_age))
    return session


def annotator_for_session(conn: sqlite3.Connection, session: str | None) -> Annotator | None:
    """The annotator of an open, unexpired session, or None."""
    if not session or len(session) > 200:
        return None
    row = conn.execute("SELECT a.* FROM sessions s JOIN annotators a USING (annotator_id) WHERE s.session_hash = ? "
                       "AND s.expires_at > ?", (auth.hash_token(session), time.time())).fetchone()
    if row is None or not row["token_hash"]:
        return None
    return Annotator(row["annotator_id"], row["name"], bool(row["is_admin"]), row["token_hash"])


def close_session(conn: sqlite3.Connection, session: str | None) -> None:
    """End a session (logging out); the annotator's other sessions stay."""
    if session:
        with write(conn):
            conn.execute("DELETE FROM sessions WHERE session_hash = ?", (auth.hash_token(session),))


# ---------------------------------------------------------------- tasks, drafts, answers

def task(conn: sqlite3.Connection, annotator_id: int, item_id: int) -> sqlite3.Row | None:
    """The annotator's task for ``item_id`` joined with the item; None when it is not theirs."""
    return conn.execute("SELECT t.*, i.pair_id, i.kind, i.prompt, i.chosen, i.rejected, i.prefill_meta, i.expected "
                        "FROM tasks t JOIN items i USING (item_id) WHERE t.annotator_id = ? AND t.item_id = ?",
                        (annotator_id, item_id)).fetchone()


def draft(conn: sqlite3.Connection, annotator_id: int, item_id: int) -> sqlite3.Row | None:
    return conn.execute("SELECT * FROM drafts WHERE annotator_id = ? AND item_id = ?",
                        (annotator_id, item_id)).fetchone()


def task_version(t: sqlite3.Row) -> int:
    """How many answers task ``t`` was given (one more at every answer): a page carries the version it was
    opened at, so a draft posted from before an answer is told apart from one written after it."""
    return t["revisions"] + (t["status"] != "open")


_VERSION = "revisions + (status != 'open')"  # :func:`task_version` in SQL


def save_draft(conn: sqlite3.Connection, annotator_id: int, item_id: int, text: str, spans: list,
               note: str | None, active_s: float, version: int | None = None) -> float | None:
    """Upsert the draft of a task (one small transaction); returns its time stamp.

    With ``version`` (the task's :func:`task_version` when the page was opened), stores nothing and returns
    None when the task was answered since: a draft arriving after the answer (in flight, another tab)
    must not outlive it.
    """
    now = time.time()
    with write(conn):
        if version is not None:
            row = conn.execute(f"SELECT {_VERSION} FROM tasks WHERE annotator_id = ? AND item_id = ?",
                               (annotator_id, item_id)).fetchone()
            if row is None or row[0] != version:
                return None
        conn.execute("INSERT INTO drafts (annotator_id, item_id, text, spans, note, active_s, updated_at) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (annotator_id, item_id) DO UPDATE SET "
                     "text = excluded.text, spans = excluded.spans, note = excluded.note, "
                     "active_s = excluded.active_s, updated_at = excluded.updated_at",
                     (annotator_id, item_id, text, json.dumps(spans), note, active_s, now))
    return now


@dataclass
class Answer:
    """A validated answer to one task (see :mod:`finegrain.annotate.answers`)."""

    action: str
    edited: str | None
    spans: list
    note: str | None
    flag_reason: str | None
    active_s: float
    edit_ratio: float | None
    stats: dict | None
    guidelines_version: str


class RevisionLimitError(ValueError):
    """An answer already changed ``max_revisions`` times: :func:`record_answer` refused another change."""


def record_answer(conn: sqlite3.Connection, annotator_id: int, item_id: int, answer: Answer,
                  allowed: tuple[str, ...], max_revisions: int = MAX_REVISIONS) -> bool:
    """Store ``answer`` in ONE transaction: the task row, the submissions log, the draft removed.

    Returns False (and writes nothing) when the task's status is not in ``allowed`` any more, e.g.
    the same answer posted twice from two tabs. The revision cap is in the UPDATE itself, so two
    posts racing past a check made before it cannot both land: the loser gets RevisionLimitError.
    """
    now = time.time()
    spans = json.dumps(answer.spans)
    stats = json.dumps(answer.stats) if answer.stats is not None else None
    with write(conn):
        cur = conn.execute(
            f"UPDATE tasks SET status = ?, answered_at = ?, edited = ?, spans = ?, note = ?, flag_reason = ?, "
            f"active_s = ?, edit_ratio = ?, stats = ?, guidelines_version = ?, "
            f"revisions = revisions + (CASE WHEN status = 'open' THEN 0 ELSE 1 END) "
            f"WHERE annotator_id = ? AND item_id = ? AND status IN ({','.join('?' * len(allowed))}) "
            f"AND (status = 'open' OR revisions < ?)",
            (answer.action, now, answer.edited, spans, answer.note, answer.flag_reason, answer.active_s,
             answer.edit_ratio, stats, answer.guidelines_version, annotator_id, item_id, *allowed, max_revisions))
        if cur.rowcount != 1:
            row = conn.execute("SELECT status, revisions FROM tasks WHERE annotator_id = ? AND item_id = ?",
                               (annotator_id, item_id)).fetchone()
            if row is not None and row["status"] in allowed and row["revisions"] >= max_revisions:
                raise RevisionLimitError(f"an answer can be changed at most {max_revisions} times, and this one "
                                         "was: the last version stands")
            return False
        conn.execute("INSERT INTO submissions (annotator_id, item_id, action, edited, spans, note, flag_reason, "
                     "active_s, edit_ratio, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     (annotator_id, item_id, answer.action, answer.edited, spans, answer.note, answer.flag_reason,
                      answer.active_s, answer.edit_ratio, now))
        conn.execute("DELETE FROM drafts WHERE annotator_id = ? AND item_id = ?", (annotator_id, item_id))
    return True


def annotator_tasks(conn: sqlite3.Connection, annotator_id: int) -> list[sqlite3.Row]:
    return conn.execute("SELECT t.*, i.pair_id, i.kind, i.prompt, i.rejected FROM tasks t JOIN items i "
                        "USING (item_id) WHERE t.annotator_id = ? ORDER BY t.seq", (annotator_id,)).fetchall()


__all__ = ["ANSWERS", "Annotator", "Answer", "MAX_REVISIONS", "RevisionLimitError", "STATUSES", "Store",
           "add_annotator", "annotator_for_session", "annotator_for_token", "annotator_tasks", "check_name",
           "close_session", "draft", "ensure_admin", "get_meta", "item", "open_session", "record_answer", "save_draft",
           "set_meta", "settings", "sync_items", "task", "task_version", "write"]
