"""Editor and judge backends: one interface for LLM APIs, local models, human files and the sandbox.

Interfaces (stable: the sandbox's ``SandboxEditor`` / ``SandboxJudge`` implement them)::

    @dataclass
    class EditRequest:  id: str; prompt: str; response: str; meta: dict   # response = the rejected response to edit
    @dataclass
    class EditResult:   text: str | None; raw: str | None = None; input_tokens: int = 0; output_tokens: int = 0;
                        error: str | None = None
    @dataclass
    class JudgeRequest: id: str; instruction: str; output_1: str; output_2: str
    @dataclass
    class JudgeResult:  preference: float; raw: str | None = None; input_tokens: int = 0; output_tokens: int = 0;
                        error: str | None = None
        # preference: 1.0 = output_1 better, 2.0 = output_2 better, 1.5 = tie (AlpacaEval's convention)
    class EditorBackend(Protocol):  name: str; model: str;  async def edit(self, req: EditRequest) -> EditResult
    class JudgeBackend(Protocol):   name: str; model: str;  async def judge(self, req: JudgeRequest) -> JudgeResult
    def get_editor(backend: str, model: str, **options) -> EditorBackend
    def get_judge(backend: str, model: str, **options) -> JudgeBackend

Backends: ``anthropic`` (official SDK, Messages API), ``openai`` (official SDK, Chat Completions;
``base_url`` for vLLM, TGI, Ollama, llama.cpp server or any OpenAI-compatible server), ``hf`` (a
local transformers causal LM, batched), ``file`` (human edits / judgements read from a file, see
:mod:`finegrain.edit.human`) and ``sandbox`` (``finegrain.sandbox.backends``, imported lazily).

How a backend reports failure (the runner, :mod:`finegrain.edit.runner`, relies on it):

- RAISE :class:`RetryableError` (optionally with ``retry_after`` seconds) for a failure worth
  retrying: 429, 5xx, timeouts, dropped connections, malformed responses; its subclass
  :class:`UnreachableError` when the server could not be reached at all (connection refused,
  unknown host), which stops a run that has had no answer yet;
- RAISE :class:`FatalBackendError` for a failure every request would hit (bad API key, unknown
  model): the run stops with one clear line, and what was answered stays in the cache;
- RETURN a result with ``error = "code: message"`` for an item that got no usable answer
  (``code`` becomes the reject reason). A result is cached when its call was answered
  (``error is None`` or ``raw`` is set), so a re-run never pays twice for it.

Optional attributes the runner reads with ``getattr``: ``prompt_version`` (str, part of the
cache key; default ``"none"``), ``cache_salt`` (str, anything else that changes answers, e.g.
prompt text and sampling options), ``cacheable`` (bool, default True), ``remote`` (bool, default
True: per-request timeouts apply), ``item_meta(id) -> dict`` (extra ``edit_meta`` fields) and
``item_gold_spans(id) -> list | None`` (the edited pair's ``gold_spans``, e.g. marked by a person).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..errors import ConfigError, FinegrainError

BACKENDS = ("anthropic", "openai", "hf", "file", "sandbox")


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


def resolve_api_key(env_var: str, *, required: bool) -> str | None:
    """The API key from environment variable ``env_var`` (never from a file or a flag)."""
    key = os.environ.get(env_var)
    if not key and required:
        raise ConfigError(f"no API key: set the environment variable {env_var} (or choose another variable "
                          "with --api-key-env)")
    return key or None


_CLIENT_OPTIONS = ("base_url", "api_key_env", "timeout", "max_tokens", "temperature", "batch_size", "device",
                   "dtype", "trust_remote_code")


def _chat_client(backend: str, model: str, options: dict[str, Any]):
    opts = {k: options[k] for k in _CLIENT_OPTIONS if options.get(k) is not None}
    if backend == "anthropic":
        from .llm import AnthropicClient

        return AnthropicClient(model, **{k: v for k, v in opts.items() if k in AnthropicClient.OPTIONS})
    if backend == "openai":
        from .llm import OpenAIClient

        return OpenAIClient(model, **{k: v for k, v in opts.items() if k in OpenAIClient.OPTIONS})
    from .local import HFChatClient

    return HFChatClient(model, **{k: v for k, v in opts.items() if k in HFChatClient.OPTIONS})


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")


def get_editor(backend: str, model: str, **options: Any) -> EditorBackend:
    """An editor backend by name.

    Options for ``anthropic`` / ``openai`` / ``hf``: ``prompt`` (a packaged prompt name such as
    ``minimal_edit_v1`` or a path to a prompt file), ``base_url``, ``api_key_env``, ``timeout``,
    ``max_tokens``, ``temperature``; ``hf`` also ``batch_size``, ``device``, ``dtype``. ``file``:
    ``model`` is the path of a human-edits JSONL file. ``sandbox``: options go to ``SandboxEditor``.
    """
    _check_backend(backend)
    if backend == "file":
        from .human import FileEditor

        return FileEditor(model)
    if backend == "sandbox":
        from ..sandbox.backends import SandboxEditor

        return SandboxEditor(model, **options)
    from .llm import ChatEditor
    from .prompts import load_prompt

    return ChatEditor(_chat_client(backend, model, options), load_prompt(options.get("prompt") or "minimal_edit_v1"))


def get_judge(backend: str, model: str, **options: Any) -> JudgeBackend:
    """A pairwise judge backend by name (options as for :func:`get_editor`; default prompt ``pairwise_judge_v1``).

    ``file``: ``model`` is the path of judgements in AlpacaEval's annotations format.
    """
    _check_backend(backend)
    if backend == "file":
        from .human import FileJudge

        return FileJudge(model)
    if backend == "sandbox":
        from ..sandbox.backends import SandboxJudge

        return SandboxJudge(model, **options)
    from .llm import ChatJudge
    from .prompts import load_prompt

    return ChatJudge(_chat_client(backend, model, options), load_prompt(options.get("prompt") or "pairwise_judge_v1"))
