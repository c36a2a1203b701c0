"""Login tokens and CSRF tokens.

- A login token is ``<annotator id>.<43 random URL-safe characters>`` (256 bits from
  :mod:`secrets`). Only its sha256 is stored; a presented token is checked by looking up the
  annotator by the id before the dot and comparing the hashes with :func:`hmac.compare_digest`
  (constant time).
- The login link carries the token in the URL fragment (``/login#token=...``). Browsers never
  send a fragment to the server, so the token is in no request line, access log or Referer
  header; the login page posts it once and the server answers with an HttpOnly,
  SameSite=Strict cookie. The page then drops the fragment from the address bar and history.
- The cookie holds a session id, not the token: 256 random bits of its own, stored as its sha256
  with the annotator and an expiry. Logging out deletes the session, a new token deletes all of
  the annotator's sessions, and the long-lived token reaches no other service that shares the
  host's cookies (browsers do not separate cookies by port).
- The CSRF token of a login is HMAC-SHA256(server key, token hash): the same for every page of
  that login, different for every login, and it survives a restart (the key is in the
  database). Every POST must carry it, besides passing the Origin check of the app.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets

_TOKEN_BYTES = 32


def new_token(annotator_id: int) -> str:
    """A fresh login token for ``annotator_id``."""
    return f"{annotator_id}.{secrets.token_urlsafe(_TOKEN_BYTES)}"


def new_session_id() -> str:
    """A fresh session id (the login cookie's value)."""
    return secrets.token_urlsafe(_TOKEN_BYTES)


def hash_token(token: str) -> str:
    """The sha256 (hex) stored in place of ``token``."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def token_annotator_id(token: str) -> int | None:
    """The annotator id a token claims, or None when it is not shaped like a token."""
    head, dot, rest = token.partition(".")
    if not dot or not head.isdigit() or len(head) > 12 or not 20 <= len(rest) <= 100:
        return None
    return int(head)


def token_matches(token: str, stored_hash: str) -> bool:
    """Constant-time comparison of ``token``'s hash with the stored one."""
    return hmac.compare_digest(hash_token(token).encode(), stored_hash.encode())


def new_secret_key() -> str:
    return secrets.token_hex(32)


def csrf_token(secret_key: str, token_hash: str) -> str:
    """The CSRF token of one login (see module docstring)."""
    return hmac.new(bytes.fromhex(secret_key), b"csrf:" + token_hash.encode(), hashlib.sha256).hexdigest()


def csrf_ok(secret_key: str, token_hash: str, presented: object) -> bool:
    return isinstance(presented, str) and hmac.compare_digest(csrf_token(secret_key, token_hash).encode(),
                                                              presented.encode("utf-8", "replace"))


__all__ = ["csrf_ok", "csrf_token", "hash_token", "new_secret_key", "new_session_id", "new_token", "token_annotator_id",
           "token_matches"]
