"""What every command that calls an editor or judge shares (module ``finegrain.llm.calls``).

:class:`LLMCallConfig` (the options: endpoint, key variable, cache, concurrency, retries, prices,
``--backend-options``), the paths beside an output (:func:`output_base`,
:func:`resolve_cache_path`), and asking a backend for every request through the answer cache
(:func:`make_job`, :func:`run_cached`, :func:`usage_summary`); ``finegrain edit`` and ``finegrain
winrate`` are built on them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence

from ..config import opt
from ..errors import ConfigError
from ..io import check_output_file
from .accounting import Usage, load_price_table, lookup_price
from .backends import backend_spec
from .cache import AnswerCache, cache_key, input_hash
from .runner import Job, Outcome, RetryPolicy, run_calls


@dataclass(kw_only=True)
class LLMCallConfig:
    """Options shared by every command that calls an editor or judge backend (keyword-only, listed last)."""

    base_url: str | None = opt(None, "OpenAI-compatible or Anthropic endpoint (vLLM: http://localhost:8000/v1, "
                                     "Ollama: http://localhost:11434/v1)")
    api_key_env: str | None = opt(None, "environment variable holding the API key (default ANTHROPIC_API_KEY or "
                                        "OPENAI_API_KEY); keys are never read from flags or files")
    cache: str | None = opt(None, "SQLite cache of answers (default: OUTPUT_BASE.cache.sqlite beside the output; "
                                  "'none' disables; the file and sandbox backends, free to ask again, have none); "
                                  "share one file between runs to never pay twice")
    concurrency: int = opt(8, "requests in flight at once")
    requests_per_minute: float = opt(0.0, "cap on request starts per minute (0 = no cap)")
    timeout: float = opt(120.0, "seconds per request attempt (0 = no limit)")
    max_retries: int = opt(5, "retries of a request after 429, 5xx, timeouts or malformed answers")
    backoff_base: float = opt(1.0, "first retry delay in seconds; doubles each retry, with jitter")
    backoff_max: float = opt(60.0, "longest retry delay in seconds (a server's Retry-After may ask for more)")
    max_tokens: int = opt(2048, "longest answer in tokens")
    temperature: float | None = opt(None, "sampling temperature (default: the backend's own; hf: greedy)")
    batch_size: int = opt(8, "hf backend: prompts generated together")
    price_table: str | None = opt(None, "YAML of model-prefix: [input, output] USD per million tokens "
                                        "(default: the packaged table)")
    price_input: float | None = opt(None, "USD per million input tokens (overrides the table)", ge=0)
    price_output: float | None = opt(None, "USD per million output tokens (overrides the table)", ge=0)
    backend_options: dict = opt(default_factory=dict, help="extra backend options, KEY=VALUE,... (e.g. sandbox: "
                                                            "seed=1)")
    seed: int = opt(0, "seed of retry jitter (and of the judge's output order)", ge=0)

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(concurrency=self.concurrency, requests_per_minute=self.requests_per_minute,
                           timeout=self.timeout or None, max_retries=self.max_retries,
                           backoff_base=self.backoff_base, backoff_max=self.backoff_max)

    def backend_kwargs(self, backend: str, prompt: str | None) -> dict[str, Any]:
        """The options of backend ``backend``'s factory: ``--backend-options``, after the shared LLM options when
        the backend takes them (:class:`~finegrain.llm.backends.BackendSpec`)."""
        if not backend_spec(backend).llm_options:
            return dict(self.backend_options)
        kw = dict(prompt=prompt, base_url=self.base_url, api_key_env=self.api_key_env, timeout=self.timeout or None,
                  max_tokens=self.max_tokens, temperature=self.temperature, batch_size=self.batch_size)
        kw.update(self.backend_options)
        return kw

    def price(self, backend: str, model: str) -> tuple[float, float] | None:
        """USD per million ``(input, output)`` tokens of ``model`` (see :mod:`finegrain.llm.accounting`)."""
        return lookup_price(backend, model, load_price_table(self.price_table), self.price_input, self.price_output)

    def check_llm(self) -> None:
        for name in ("concurrency", "max_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("requests_per_minute", "timeout", "max_retries", "backoff_base", "backoff_max", "temperature"):
            if (getattr(self, name) or 0) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must not be negative")
        if self.price_table:  # a bad table stops the command before any request, not after
            load_price_table(self.price_table)

    def check_outputs(self, output: str, *beside: tuple[str, str]) -> None:
        """Refuse, before any request, an output that cannot be written: ``output``, the files written beside it
        (``(path, what)``, e.g. ``(base + ".summary.json", "the summary beside --output")``) and the cache."""
        check_output_file(output, "--output")
        for path, what in beside:
            check_output_file(path, what)
        cache = resolve_cache_path(self.cache, output)
        if cache:
            check_output_file(cache, "--cache" if self.cache else "the cache beside --output")


def output_base(path: str) -> str:
    """``out/edited.jsonl`` -> ``out/edited`` (the stem beside which rejects and summary go)."""
    return re.sub(r"(\.jsonl|\.json|\.parquet)?(\.gz)?$", "", path)


def resolve_cache_path(cache: str | None, output: str, backend: Any = None) -> str | None:
    """The answer cache's path: ``--cache``, else beside ``output``; None for 'none' or for a ``backend`` that is
    not ``cacheable`` (a file or the sandbox: an empty cache file would only mislead)."""
    if backend is not None and not getattr(backend, "cacheable", True):
        return None
    if cache is None:
        return output_base(output) + ".cache.sqlite"
    return None if cache.lower() in ("", "none", "off") else cache


def make_job(kind: str, backend: Any, item_id: str, request: Any, *texts: str) -> Job:
    """The job asking ``backend`` for ``request``, keyed by ``texts`` (what the answer depends on) and the
    backend's name, model, ``prompt_version`` and ``cache_salt``; for a backend that is not ``cacheable`` (human
    edits read by id, the sandbox) also by ``item_id``, so two items with the same texts get their own answers."""
    per_item = () if getattr(backend, "cacheable", True) else (item_id,)
    h = input_hash(*texts, *per_item, getattr(backend, "cache_salt", ""))
    return Job(cache_key(kind, backend.name, backend.model, getattr(backend, "prompt_version", "none"), h), h,
               item_id, request)


def run_cached(jobs: Sequence[Job], call: Callable[[Any], Awaitable[Any]], *, kind: str, backend: Any,
               result_cls: type, cache_path: str | None, policy: RetryPolicy, seed: int = 0,
               desc: str = "") -> dict[str, Outcome]:
    """:func:`~finegrain.llm.runner.run_calls` with the answer cache at ``cache_path`` (None: no cache), closed
    at the end."""
    cache = AnswerCache(cache_path)
    try:
        return run_calls(jobs, call, kind=kind, backend=backend, result_cls=result_cls, cache=cache, policy=policy,
                         seed=seed, desc=desc)
    finally:
        cache.close()


def usage_summary(price: tuple[float, float] | None, jobs: Sequence[Job], outcomes: dict[str, Outcome]
                  ) -> dict[str, Any]:
    """Requests, tokens and cost of a run (:class:`~finegrain.llm.accounting.Usage`), each distinct job once."""
    return Usage(price).add(outcomes[key] for key in dict.fromkeys(j.key for j in jobs)).summary()


__all__ = ["LLMCallConfig", "make_job", "output_base", "resolve_cache_path", "run_cached", "usage_summary"]
