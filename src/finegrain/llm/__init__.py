"""The LLM layer shared by ``finegrain edit`` and ``finegrain winrate``: backends, runner, cache, costs, prompts.

Foundation: imports no stage package. Modules:

- :mod:`~finegrain.llm.backends`  request/result types, backend interfaces, errors, the backend registry
  (:func:`get_editor`, :func:`get_judge`, :func:`register_backend`, entry-point group ``finegrain.backends``);
- :mod:`~finegrain.llm.clients`   chat clients of the Anthropic and OpenAI APIs (official SDKs);
- :mod:`~finegrain.llm.local`     a local transformers model as a batched chat client (backend ``hf``);
- :mod:`~finegrain.llm.chat`      editing and judging with any chat client (``ChatEditor``, ``ChatJudge``);
- :mod:`~finegrain.llm.files`     human edits and judgements read from files (backend ``file``);
- :mod:`~finegrain.llm.prompts`   versioned prompt templates (package files under ``prompts/``);
- :mod:`~finegrain.llm.runner`    concurrency, rate cap, timeouts, retries, failure watch;
- :mod:`~finegrain.llm.cache`     the SQLite answer cache;
- :mod:`~finegrain.llm.accounting` tokens and costs (package price table ``prices.yaml``);
- :mod:`~finegrain.llm.calls`     the options and plumbing of a command that calls a backend (``LLMCallConfig``).

Names are imported lazily so that ``import finegrain.llm`` stays light (no SDK, no torch).
"""
from __future__ import annotations

from .._lazy import lazy_exports

_LAZY = {name: "backends" for name in (
    "EditRequest", "EditResult", "JudgeRequest", "JudgeResult", "EditorBackend", "JudgeBackend", "BackendSpec",
    "RetryableError", "UnreachableError", "FatalBackendError", "get_editor", "get_judge", "register_backend",
    "backend_names")}
_LAZY.update({"LLMCallConfig": "calls", "load_prompt": "prompts", "AnswerCache": "cache", "RetryPolicy": "runner",
              "run_calls": "runner"})

__all__ = sorted(_LAZY)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
