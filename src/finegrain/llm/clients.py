"""Chat clients of LLM APIs through the official SDKs (module ``finegrain.llm.clients``).

A *chat client* turns ``(system, user)`` into a :class:`Completion`: :class:`AnthropicClient`
(Messages API) and :class:`OpenAIClient` (Chat Completions, or any compatible server), here, and
the local transformers one in :mod:`finegrain.llm.local`. :mod:`finegrain.llm.chat` puts a
versioned prompt around any of them to edit or judge.

The SDKs' own retries are switched off (``max_retries=0``): the runner retries, so that its
backoff, Retry-After handling and request counts are the only ones in play. Keys come from the
environment only (:func:`~finegrain.llm.backends.resolve_api_key`) and are scrubbed from every
error message kept.
"""
from __future__ import annotations

import contextlib
import email.utils
import json
import time
from dataclasses import dataclass
from typing import Any

from .interfaces import FatalBackendError, RetryableError, UnreachableError, resolve_api_key


@dataclass
class Completion:
    text: str
    input_tokens: int = 0
    output_tokens: int = 0
    truncated: bool = False  # stopped by the max_tokens limit


def parse_retry_after(headers: Any) -> float | None:
    """Seconds from ``retry-after-ms``, ``retry-after`` (seconds or an HTTP date), else None."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, parsed.timestamp() - time.time())


class _SDKClient:
    """What the two SDK clients share: the key, the error mapping, the scrubbing."""

    name = "?"
    remote = True
    OPTIONS = ("base_url", "api_key_env", "timeout", "max_tokens", "temperature")
    DEFAULT_KEY_ENV = ""

    def __init__(self, model: str, *, base_url: str | None = None, api_key_env: str | None = None,
                 timeout: float | None = 120.0, max_tokens: int = 2048, temperature: float | None = None):
        self.model, self.base_url = model, base_url
        self.max_tokens, self.temperature, self.timeout = max_tokens, temperature, timeout
        env = api_key_env or self.DEFAULT_KEY_ENV
        # a local OpenAI-compatible server (vLLM, Ollama, ...) usually needs no key
        self._key = resolve_api_key(env, required=base_url is None) or "no-key"
        self.params = {"max_tokens": max_tokens, "temperature": temperature}

    def scrub(self, text: str) -> str:
        """``text`` without the key, also as quoted in an error (``b'Bearer sk-..\\n'``: escaped characters)."""
        if not self._key or len(self._key) <= 3:
            return text
        for form in (self._key, repr(self._key)[1:-1], repr(self._key.encode())[2:-1]):
            text = text.replace(form, "***")
        return text

    def brief(self, e: Exception) -> str:
        """The error's message, scrubbed, on one line (a proxy's HTML error page has many), at most 300 characters."""
        return " ".join(self.scrub(str(getattr(e, "message", e))).split())[:300]

    def map_error(self, e: Exception, sdk) -> Exception | None:
        """The runner-facing exception for an SDK exception, or None for a per-item failure."""
        if isinstance(e, sdk.APITimeoutError):
            return RetryableError("timeout")
        if isinstance(e, sdk.APIConnectionError):
            where = self.base_url or f"the {self.name} API"
            return UnreachableError(f"cannot connect to {where}: {self.scrub(_root_cause(e))}")
        if isinstance(e, sdk.APIStatusError):
            status = e.status_code
            message = self.brief(e)
            if status in (408, 409, 429) or status >= 500:
                return RetryableError(f"HTTP {status}: {message}", retry_after=parse_retry_after(e.response.headers))
            if status in (401, 403):
                return FatalBackendError(f"{self.name}: HTTP {status} (authentication or permission): check the API "
                                         "key in the environment and the account's access")
            if status == 404:
                return FatalBackendError(f"{self.name}: HTTP 404: model {self.model!r} or endpoint not found"
                                         + (f" at {self.base_url}" if self.base_url else ""))
            return None
        if isinstance(e, (json.JSONDecodeError, sdk.APIResponseValidationError)):
            return RetryableError(f"malformed response: {type(e).__name__}")
        return None

    async def complete(self, system: str, user: str) -> Completion:
        import importlib

        sdk = importlib.import_module(self.name)
        try:
            return await self._complete(system, user)
        except (RetryableError, FatalBackendError):  # already mapped (a malformed response: retried)
            raise
        except Exception as e:  # map every SDK failure; unknown ones become per-item errors
            mapped = self.map_error(e, sdk)
            if mapped is not None:
                raise mapped from None
            status = getattr(e, "status_code", None)
            raise ItemFailure(f"http_{status}" if status else "error", self.brief(e)) from None

    async def _complete(self, system: str, user: str) -> Completion:  # pragma: no cover - abstract
        raise NotImplementedError

    async def aclose(self) -> None:
        client = getattr(self, "_client", None)
        if client is not None:
            await client.close()


def _root_cause(e: BaseException) -> str:
    """The message of the innermost cause of ``e`` (``[Errno 111] Connection refused`` rather than "Connection error.")."""
    seen = {id(e)}
    while (nxt := e.__cause__ or e.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        e = nxt
    return str(e) or type(e).__name__


@contextlib.contextmanager
def _malformed_guard():
    """A response that parsed as JSON but lacks the fields of the wire format: retry it."""
    try:
        yield
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as e:
        raise RetryableError(f"malformed response: {type(e).__name__}") from None


class ItemFailure(Exception):
    """A per-item failure of a chat client (``code``: the reject reason), not worth retrying."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class AnthropicClient(_SDKClient):
    """Anthropic Messages API (``AsyncAnthropic``); key from ``ANTHROPIC_API_KEY`` by default."""

    name = "anthropic"
    DEFAULT_KEY_ENV = "ANTHROPIC_API_KEY"

    def __init__(self, model: str, **kw: Any):
        super().__init__(model, **kw)
        import anthropic

        self._client = anthropic.AsyncAnthropic(api_key=self._key, base_url=self.base_url, max_retries=0,
                                                timeout=self.timeout)

    async def _complete(self, system: str, user: str) -> Completion:
        kw: dict[str, Any] = dict(model=self.model, max_tokens=self.max_tokens,
                                  messages=[{"role": "user", "content": user}])
        if system:
            kw["system"] = system
        if self.temperature is not None:  # recent SDKs have no `temperature` argument: send it in the body
            kw["extra_body"] = {"temperature": self.temperature}
        msg = await self._client.messages.create(**kw)
        with _malformed_guard():
            text = "".join(b.text for b in msg.content if getattr(b, "type", None) == "text")
            usage = msg.usage
            return Completion(text, int(usage.input_tokens or 0), int(usage.output_tokens or 0),
                              truncated=msg.stop_reason in ("max_tokens", "model_context_window_exceeded"))


class OpenAIClient(_SDKClient):
    """OpenAI Chat Completions (``AsyncOpenAI``), or any compatible server via ``base_url``."""

    name = "openai"
    DEFAULT_KEY_ENV = "OPENAI_API_KEY"

    def __init__(self, model: str, **kw: Any):
        super().__init__(model, **kw)
        import openai

        self._client = openai.AsyncOpenAI(api_key=self._key, base_url=self.base_url, max_retries=0,
                                          timeout=self.timeout)

    async def _complete(self, system: str, user: str) -> Completion:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        kw: dict[str, Any] = {} if self.temperature is None else {"temperature": self.temperature}
        resp = await self._client.chat.completions.create(model=self.model, messages=messages,
                                                          max_tokens=self.max_tokens, **kw)
        with _malformed_guard():
            choice = resp.choices[0]
            usage = resp.usage  # some compatible servers send no usage
            return Completion(_message_text(choice.message.content),
                              int(getattr(usage, "prompt_tokens", 0) or 0), int(getattr(usage, "completion_tokens", 0) or 0),
                              truncated=choice.finish_reason == "length")


def _message_text(content: Any) -> str:
    """A message's text: a string, none (""), or a list of content parts (some compatible servers send those);
    anything else is a malformed response (TypeError)."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        texts = [p.get("text") for p in content if p.get("type") == "text"]
        if all(isinstance(t, str) for t in texts):
            return "".join(texts)
    raise TypeError(f"message content is a {type(content).__name__}, not text")
