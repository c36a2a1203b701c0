"""Which item an annotator gets next: deterministic, resumable, at most once each, K per pair.

The rule, applied in one write transaction when an annotator has no open task:

1. An annotator works on one item at a time: their open task (the lowest ``seq`` not yet
   answered) is their current item, across reloads and server restarts.
2. Their n-th item (n = 1, 2, ...) is a screening item when screening is on and n is a multiple of
   ``every = round(1 / --screening-rate)``: the first screening item (in file order) they have
   not seen. Every annotator gets every screening item, once, so screening scores compare.
3. Otherwise it is the first pair in queue order (the order of ``--data``; pairs added later come
   after) that this annotator has not been given, that fewer than ``--overlap`` annotators hold
   (an open task or an answer; a skip gives the slot back), and that nobody has flagged.

So each annotator sees each pair at most once, each pair goes to at most K annotators, and pairs
are completed in order (annotators move through the file together rather than scattering).
When no pair is left the annotator is done, whatever screening items remain.
"""
from __future__ import annotations

import sqlite3
import time

from .store import write

_ELIGIBLE_PAIRS = """
SELECT i.item_id FROM items i
WHERE i.kind = 'pair'
  AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.item_id = i.item_id AND t.annotator_id = :annotator)
  AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.item_id = i.item_id AND t.status = 'flag')
  AND (SELECT COUNT(*) FROM tasks t WHERE t.item_id = i.item_id AND t.status != 'skip') < :overlap
ORDER BY i.item_id
"""

_UNSEEN_SCREENING = """
SELECT i.item_id FROM items i
WHERE i.kind = 'screening'
  AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.item_id = i.item_id AND t.annotator_id = :annotator)
ORDER BY i.item_id LIMIT 1
"""


def screening_every(rate: float) -> int:
    """Every how many items one is a screening item (0 = never)."""
    return 0 if rate <= 0 else max(2, round(1 / rate))


def open_task(conn: sqlite3.Connection, annotator_id: int) -> int | None:
    row = conn.execute("SELECT item_id FROM tasks WHERE annotator_id = ? AND status = 'open' ORDER BY seq LIMIT 1",
                       (annotator_id,)).fetchone()
    return row[0] if row else None


def current_item(conn: sqlite3.Connection, annotator_id: int, overlap: int, every: int) -> int | None:
    """The annotator's open item, else a newly assigned one by the rule above, else None (done)."""
    found = open_task(conn, annotator_id)
    if found is not None:
        return found
    with write(conn):
        found = open_task(conn, annotator_id)  # another tab may have assigned one meanwhile
        if found is not None:
            return found
        seq = conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM tasks WHERE annotator_id = ?",
                           (annotator_id,)).fetchone()[0]
        args = {"annotator": annotator_id, "overlap": overlap}
        row = conn.execute(_ELIGIBLE_PAIRS + " LIMIT 1", args).fetchone()
        if row is None:
            return None
        if every and seq % every == 0:
            row = conn.execute(_UNSEEN_SCREENING, args).fetchone() or row
        item_id = row[0]
        conn.execute("INSERT INTO tasks (annotator_id, item_id, seq, assigned_at, prefill) "
                     "SELECT ?, item_id, ?, ?, prefill FROM items WHERE item_id = ?",
                     (annotator_id, seq, time.time(), item_id))
    return item_id


def remaining_pairs(conn: sqlite3.Connection, annotator_id: int, overlap: int) -> int:
    """Pairs this annotator could still be given (an estimate: others may take the last slots)."""
    return conn.execute(f"SELECT COUNT(*) FROM ({_ELIGIBLE_PAIRS})", {"annotator": annotator_id,
                                                                    "overlap": overlap}).fetchone()[0]


__all__ = ["current_item", "open_task", "remaining_pairs", "screening_every"]
