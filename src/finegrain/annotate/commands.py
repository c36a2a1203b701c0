"""``finegrain annotate add-annotator``: a personal login link (needs no web stack)."""
from __future__ import annotations

from typing import Any

from . import store as db
from .config import AddAnnotatorConfig
from .server import login_url

DEFAULT_BASE_URL = "http://127.0.0.1:8000"


def add_annotator(cfg: AddAnnotatorConfig) -> dict[str, Any]:
    """Create annotator ``cfg.name`` (or give them a new token) and return their login link.

    The link is shown once: the database keeps only the sha256 of its token.
    """
    store = db.Store(cfg.db)
    with store.connect() as conn:
        token = db.add_annotator(conn, cfg.name, admin=cfg.admin, new_token=cfg.new_token)
        base = cfg.public_url or db.get_meta(conn, "public_url") or DEFAULT_BASE_URL
    return {"name": db.check_name(cfg.name), "admin": cfg.admin, "login_url": login_url(base, token),
            "note": "send this link to this person only; it is shown once (only its hash is stored)"}


__all__ = ["add_annotator"]
