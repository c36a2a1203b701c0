"""A SQLite cache of backend answers, so a re-run or a resume after a crash never pays twice
(module ``finegrain.llm.cache``).

One row per answered request, keyed by sha256 of (kind, backend, model, prompt version, input
hash); the input hash covers everything that changes the answer (the texts, the prompt
template's digest, sampling options). Each row is committed as soon as its answer arrives, in
WAL mode, so a SIGKILL loses at most the requests in flight. Several processes may share one
cache file (WAL + busy timeout). Nothing secret is stored: only texts, token counts and times.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from ..errors import InputError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    backend TEXT NOT NULL,
    model TEXT NOT NULL,
    prompt_version TEXT NOT NULL,
    input_hash TEXT NOT NULL,
    item_id TEXT,
    result TEXT NOT NULL,
    created REAL NOT NULL
)
"""


def input_hash(*parts: Any) -> str:
    """sha256 of the canonical JSON of ``parts``."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def cache_key(kind: str, backend: str, model: str, prompt_version: str, in_hash: str) -> str:
    return input_hash(kind, backend, model, prompt_version, in_hash)


class AnswerCache:
    """``get(key)`` / ``put(key, ...)`` of JSON results; ``path=None`` keeps nothing (no cache)."""

    def __init__(self, path: str | Path | None):
        self.path = str(path) if path else None
        self._db: sqlite3.Connection | None = None
        if self.path:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a process kill
                self._db.execute(_SCHEMA)
            except sqlite3.DatabaseError as e:  # not a SQLite file (a JSONL given as --cache), or damaged
                self.close()
                raise InputError(f"cannot use it as the answer cache ({e}); give another --cache path, or 'none'",
                                 path=self.path) from None

    def get(self, key: str) -> dict[str, Any] | None:
        if self._db is None:
            return None
        row = self._db.execute("SELECT result, created FROM answers WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        out = json.loads(row[0])
        out.setdefault("_created", row[1])
        return out

    def put(self, key: str, *, kind: str, backend: str, model: str, prompt_version: str, in_hash: str,
            item_id: str | None, result: dict[str, Any]) -> None:
        if self._db is None:
            return
        self._db.execute(
            "INSERT OR REPLACE INTO answers (key, kind, backend, model, prompt_version, input_hash, item_id, result,"
            " created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (key, kind, backend, model, prompt_version, in_hash, item_id, json.dumps(result, ensure_ascii=False),
             time.time()))

    def item_ids(self, kind: str | None = None) -> set[str]:
        """Ids of the items answered so far (for inspection and tests)."""
        if self._db is None:
            return set()
        q, args = "SELECT item_id FROM answers", ()
        if kind:
            q, args = q + " WHERE kind = ?", (kind,)
        return {r[0] for r in self._db.execute(q, args)}

    def __len__(self) -> int:
        return 0 if self._db is None else self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
