"""Editing and judging with a chat model (module ``finegrain.llm.chat``).

:class:`ChatEditor` and :class:`ChatJudge` put a versioned prompt (:mod:`finegrain.llm.prompts`)
around a chat client (:mod:`finegrain.llm.clients`, :mod:`finegrain.llm.local`) and read its
answer, so every chat client edits and judges the same way. :func:`chat_backend` builds them for
the built-in backends ``anthropic``, ``openai`` and ``hf``.

Reading the answers:

- ``clean_answer`` removes what LLMs wrap around an edit even when told not to: a preamble
  ("Here is the edited response:", "Sure! Here's the revised version:", "Edited response:"), a
  code fence around the whole answer, quotation marks around the whole answer and the
  ``<response>`` tags of our own prompt. Each is removed only when the ORIGINAL response did not
  have it too (a response that itself starts with "Here is a list:" keeps it);
- ``parse_preference`` reads a judge's one-word answer (A, B or TIE) as AlpacaEval's preference.
"""
from __future__ import annotations

import re
from typing import Any

from ..errors import ConfigError
from .interfaces import EditRequest, EditResult, JudgeRequest, JudgeResult
from .cache import input_hash
from .clients import Completion, ItemFailure
from .prompts import PromptTemplate, load_prompt

_PREAMBLE_RE = re.compile(
    r"""^\s*(?:(?:sure|certainly|of\s+course|okay|ok|absolutely)[\s,!.:-]*)?
    (?:
        (?:here(?:\s+is|\s+are|'s|’s)|below\s+is|this\s+is)\s+[^\n:]{0,80}?
            (?:edit|edited|revised|revision|corrected|improved|updated|modified|fixed|rewritten|version|response|answer)
            [^\n:]{0,40}:
      | (?:the\s+)?(?:minimally\s+)?(?:edited|revised|corrected|improved|updated|modified|fixed)\s+
            (?:response|answer|version|text)\s*:
    )[ \t]*\n?""",
    re.IGNORECASE | re.VERBOSE,
)
_FENCE_RE = re.compile(r"^```[\w+-]*[ \t]*\n(.*?)\n?```$", re.DOTALL)
_TAG_RE = re.compile(r"^<(response|edited_response|output)>\s*\n?(.*?)\n?\s*</\1>$", re.DOTALL)
_QUOTES = [('"', '"'), ("“", "”"), ("'", "'"), ("«", "»")]
def _strip_once(text: str, original: str) -> str:
    m = _PREAMBLE_RE.match(text)
    if m and m.end() < len(text) and not _PREAMBLE_RE.match(original):
        return text[m.end():].strip()
    m = _FENCE_RE.match(text)
    if m and not _FENCE_RE.match(original.strip()):
        return m.group(1).strip("\n")
    m = _TAG_RE.match(text)
    if m:
        return m.group(2).strip("\n")
    for left, right in _QUOTES:
        if (len(text) >= 2 and text.startswith(left) and text.endswith(right) and left not in text[1:-1]
                and not (original.strip().startswith(left) and original.strip().endswith(right))):
            return text[1:-1].strip()
    return text


def clean_answer(answer: str, original: str) -> str:
    """The edited response inside ``answer`` (see module docstring); ``original`` is the response edited."""
    text = answer.strip()
    for _ in range(4):  # a preamble, then a fence, then quotes inside it ...
        new = _strip_once(text, original)
        if new == text:
            break
        text = new
    return text


_PREF_WORDS = {"a": 1.0, "b": 2.0, "tie": 1.5, "equal": 1.5, "draw": 1.5}
_PREF_RE = re.compile(r"^\W*(?:output\s*|answer\s*|response\s*)?\(?\s*(a|b|tie|equal|draw)\s*\)?(?:\W|$)", re.IGNORECASE)


def parse_preference(answer: str) -> float | None:
    """1.0 (output A), 2.0 (output B), 1.5 (tie) from a judge's answer, or None if it names none.

    >>> [parse_preference(x) for x in ["A", "**B**", "Output (a)", "TIE.", "tie", "Both are good"]]
    [1.0, 2.0, 1.0, 1.5, 1.5, None]
    """
    first = answer.strip().splitlines()[0] if answer.strip() else ""
    m = _PREF_RE.match(first.replace("*", "").strip())
    return _PREF_WORDS[m.group(1).lower()] if m else None


class _ChatBackend:
    """A chat client plus a versioned prompt: the runner-facing attributes of every LLM backend."""

    def __init__(self, client, prompt: PromptTemplate):
        self.client, self.prompt = client, prompt
        self.name, self.model = client.name, client.model
        self.prompt_version = prompt.version
        self.remote = getattr(client, "remote", True)
        self.cache_salt = input_hash(prompt.digest, getattr(client, "params", {}))

    async def _ask(self, **values: str) -> Completion:
        system, user = self.prompt.render(**values)
        return await self.client.complete(system, user)

    async def aclose(self) -> None:
        aclose = getattr(self.client, "aclose", None)
        if aclose is not None:
            await aclose()


class ChatEditor(_ChatBackend):
    """Minimal editing with a chat model: prompt -> answer -> :func:`clean_answer`."""

    async def edit(self, req: EditRequest) -> EditResult:
        try:
            c = await self._ask(instruction=req.prompt, response=req.response)
        except ItemFailure as e:
            return EditResult(None, error=f"{e.code}: {e}")
        if c.truncated:
            return EditResult(None, raw=c.text, input_tokens=c.input_tokens, output_tokens=c.output_tokens,
                              error=f"truncated: the answer reached max_tokens={getattr(self.client, 'max_tokens', '?')}")
        return EditResult(clean_answer(c.text, req.response), raw=c.text, input_tokens=c.input_tokens,
                          output_tokens=c.output_tokens)


class ChatJudge(_ChatBackend):
    """Pairwise judging with a chat model: prompt -> one-word answer -> preference 1, 2 or 1.5."""

    async def judge(self, req: JudgeRequest) -> JudgeResult:
        try:
            c = await self._ask(instruction=req.instruction, output_1=req.output_1, output_2=req.output_2)
        except ItemFailure as e:
            return JudgeResult(float("nan"), error=f"{e.code}: {e}")
        pref = parse_preference(c.text)
        if pref is None:
            return JudgeResult(float("nan"), raw=c.text, input_tokens=c.input_tokens, output_tokens=c.output_tokens,
                               error="unparseable: the judge's answer names neither output nor a tie")
        return JudgeResult(pref, raw=c.text, input_tokens=c.input_tokens, output_tokens=c.output_tokens)


DEFAULT_PROMPTS = {"editor": "minimal_edit_v1", "judge": "pairwise_judge_v1"}
_REQUIRED_PLACEHOLDERS = {"editor": ("response",), "judge": ("output_1", "output_2")}
_CLIENT_OPTIONS = ("base_url", "api_key_env", "timeout", "max_tokens", "temperature", "batch_size", "device",
                   "dtype", "trust_remote_code")
# what a command passes every chat backend (LLMCallConfig.backend_kwargs); a client uses those it has
SHARED_OPTIONS = ("prompt", "base_url", "api_key_env", "timeout", "max_tokens", "temperature", "batch_size")


def client_class(backend: str) -> type:
    """The chat client class of built-in backend ``anthropic``, ``openai`` or ``hf``."""
    if backend == "anthropic":
        from .clients import AnthropicClient as cls
    elif backend == "openai":
        from .clients import OpenAIClient as cls
    else:
        from .local import HFChatClient as cls
    return cls


def chat_client(backend: str, model: str, options: dict[str, Any]):
    """The chat client of built-in backend ``anthropic``, ``openai`` or ``hf``, given the options it takes
    (the registry refused any other but the shared ones, :data:`SHARED_OPTIONS`, before)."""
    cls = client_class(backend)
    # None means the client's default, except for timeout, where it means no limit (--timeout 0)
    opts = {k: options[k] for k in _CLIENT_OPTIONS
            if k in cls.OPTIONS and (options.get(k) is not None or (k == "timeout" and k in options))}
    return cls(model, **opts)


def chat_backend(backend: str, role: str, model: str, options: dict[str, Any]) -> ChatEditor | ChatJudge:
    """The ``role`` (``editor`` or ``judge``) of a built-in chat backend, with prompt ``options["prompt"]``
    (default ``minimal_edit_v1`` / ``pairwise_judge_v1``)."""
    cls = ChatEditor if role == "editor" else ChatJudge
    prompt = load_prompt(options.get("prompt") or DEFAULT_PROMPTS[role])
    missing = [n for n in _REQUIRED_PLACEHOLDERS[role] if "{" + n + "}" not in prompt.system + prompt.user]
    if missing:  # every request would go without the text to edit or judge, and be paid for
        needs = ", ".join("{" + n + "}" for n in _REQUIRED_PLACEHOLDERS[role])
        raise ConfigError(f"prompt {prompt.version!r} has no {{{missing[0]}}} placeholder, so the {role} would never "
                          f"see that text; a {role} prompt needs {needs}")
    return cls(chat_client(backend, model, options), prompt)
