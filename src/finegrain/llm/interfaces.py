"""The interfaces every editor and judge backend implements, and the errors it raises.

Backends (the built-in ones in this package, the sandbox's, a user's) import these; the registry
(:mod:`finegrain.llm.backends`) builds backends by name. The interface summary is in that module's docstring.

How a backend reports failure (the runner, :mod:`finegrain.llm.runner`, relies on it):

- RAISE :class:`RetryableError` (optionally with ``retry_after`` seconds) for a failure worth
  retrying: 429, 5xx, timeouts, dropped connections, malformed responses; its subclass
  :class:`UnreachableError` when the server could not be reached at all (connection refused,
  unknown host), which stops a run that has had no answer yet;
- RAISE :class:`FatalBackendError` for a failure every request would hit (bad API key, unknown
  model): the run stops with one clear line, and what was answered stays in the cache;
- RETURN a result with ``error = "code: message"`` for an item that got no usable answer
  (``code`` becomes the reject reason). A result is cached when its call was answered
  (``error is None`` or ``raw`` is set, :func:`is_answered`), so a re-run never pays twice for it;
  one with an error and no ``raw`` (a per-item failure such as HTTP 400) counts as a failed item.

Optional attributes the runner reads with ``getattr``: ``prompt_version`` (str, part of the
cache key; default ``"none"``), ``cache_salt`` (str, anything else that changes answers, e.g.
prompt text and sampling options), ``cacheable`` (bool, default True), ``remote`` (bool, default
True: per-request timeouts apply), ``item_meta(id) -> dict`` (extra ``edit_meta`` fields) and
``item_gold_spans(id) -> list | None`` (the edited pair's ``gold_spans``, e.g. marked by a person).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from ..errors import ConfigError, FinegrainError



@dataclass
class EditRequest:
    """One response to edit: ``response`` is the rejected response of pair ``id``."""

    id: str
    prompt: str
    response: str
    meta: dict = field(default_factory=dict)


@dataclass
class EditResult:
    """The edited response (``None`` when there is none) and what the call cost."""

    text: str | None
    raw: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None


@dataclass
class JudgeRequest:
    """Two outputs for one instruction, in the order the judge sees them."""

    id: str
    instruction: str
    output_1: str
    output_2: str


@dataclass
class JudgeResult:
    """``preference``: 1.0 = output_1 better, 2.0 = output_2 better, 1.5 = tie (AlpacaEval's convention)."""

    preference: float
    raw: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None


@runtime_checkable
class EditorBackend(Protocol):
    name: str
    model: str

    async def edit(self, req: EditRequest) -> EditResult: ...


@runtime_checkable
class JudgeBackend(Protocol):
    name: str
    model: str

    async def judge(self, req: JudgeRequest) -> JudgeResult: ...


class RetryableError(Exception):
    """A failure worth retrying; ``retry_after`` is the server's Retry-After in seconds, if any."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class UnreachableError(RetryableError):
    """The server could not be reached at all (connection refused, unknown host, a dropped connection)."""


class FatalBackendError(FinegrainError):
    """A failure every request would hit (authentication, unknown model): stop the run."""


def is_answered(result: object) -> bool:
    """Whether a backend's result holds an answer: no ``error``, or an error about an answer it got (``raw``)."""
    return getattr(result, "error", None) is None or getattr(result, "raw", None) is not None


def resolve_api_key(env_var: str, *, required: bool) -> str | None:
    """The API key from environment variable ``env_var`` (never from a file or a flag)."""
    key = (os.environ.get(env_var) or "").strip()  # a newline pasted with the key is never part of it
    if not key and required:
        raise ConfigError(f"no API key: set the environment variable {env_var} (or choose another variable "
                          "with --api-key-env)")
    return key or None
