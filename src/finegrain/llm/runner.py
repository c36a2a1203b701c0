"""Running many backend calls: bounded concurrency, rate cap, timeouts, retries, cache, progress
(module ``finegrain.llm.runner``).

``run_calls(jobs, call, ...)`` answers every :class:`Job` once: from the cache when it was
answered before (by this run, an earlier run, or a run killed half way), else by ``call``
under a semaphore (``concurrency``), a requests-per-minute cap and a per-request timeout,
retrying :class:`~finegrain.llm.backends.RetryableError` and timeouts with exponential
backoff and jitter. A server's Retry-After is honoured: that request waits at least as long,
and the rate limiter holds every other request back until then. Each answer is committed to
the cache the moment it arrives. Jobs with the same key are asked once.

A run that is not getting through stops early with one line (:class:`FailureWatch`) instead of
retrying every item for minutes: the server cannot be reached before any answer came, several
items in a row failed after all their retries, or every request failed (after its retries, or
at once with an error a retry would not fix, such as HTTP 400). What was answered before stays
in the cache.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, Sequence

from .interfaces import FatalBackendError, RetryableError, UnreachableError, is_answered
from .cache import AnswerCache

log = logging.getLogger("finegrain.llm")


@dataclass(frozen=True)
class RetryPolicy:
    concurrency: int = 8
    requests_per_minute: float = 0.0  # 0 = no cap
    timeout: float | None = 120.0     # seconds per attempt; None = no limit
    max_retries: int = 5              # attempts = 1 + max_retries
    backoff_base: float = 1.0         # first backoff in seconds, doubled each retry
    backoff_max: float = 60.0
    max_retry_after: float = 600.0    # never wait longer than this for one Retry-After
    max_unreachable: int = 3          # stop after this many attempts in a row found no server (before any answer)
    max_failed_in_a_row: int = 5      # stop after this many items in a row failed after all their retries


@dataclass
class Job:
    key: str          # cache key
    in_hash: str      # input hash (part of the key; stored for inspection)
    item_id: str
    request: Any      # EditRequest or JudgeRequest


@dataclass
class Outcome:
    """What happened to one job. ``result`` is None only when every attempt failed (``error``)."""

    result: Any
    cached: bool = False
    attempts: int = 0
    error: str | None = None
    requested_at: str | None = None
    answered_at: str | None = None


def backoff_delay(attempt: int, policy: RetryPolicy, retry_after: float | None, rng: random.Random) -> float:
    """Seconds to wait before retry ``attempt + 1`` (``attempt`` counts from 0).

    Exponential with "equal jitter": half of ``min(backoff_max, base * 2**attempt)`` fixed, half
    uniform, so clients that failed together do not retry together. A Retry-After from the
    server is a lower bound (capped at ``max_retry_after``).
    """
    cap = min(policy.backoff_max, policy.backoff_base * (2 ** attempt))
    delay = cap / 2 + rng.uniform(0, cap / 2)
    if retry_after is not None and retry_after > 0:
        delay = max(delay, min(retry_after, policy.max_retry_after))
    return delay


class RateLimiter:
    """At most ``rpm`` request starts per minute (evenly spaced); ``pause_until`` holds all starts."""

    def __init__(self, rpm: float = 0.0, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep):
        self.interval = 60.0 / rpm if rpm and rpm > 0 else 0.0
        self._clock, self._sleep = clock, sleep
        self._next = -math.inf
        self._paused_until = -math.inf
        self._lock: asyncio.Lock | None = None

    def pause_until(self, t: float) -> None:
        self._paused_until = max(self._paused_until, t)

    async def acquire(self) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            start = max(self._next, self._paused_until)
            now = self._clock()
            if start > now:
                await self._sleep(start - now)
                now = self._clock()
            self._next = max(now, start) + self.interval


class FailureWatch:
    """Stops a run that is not getting through, with one line saying what is wrong (:class:`FatalBackendError`).

    - ``policy.max_unreachable`` attempts in a row could not reach the server and nothing was
      answered yet: the server is not there (wrong --base-url, not started);
    - ``policy.max_failed_in_a_row`` items in a row failed after all their retries (no answer in
      between): every request fails;
    - at the end (:meth:`finish`), some item failed and nothing was answered, now or in an
      earlier run (a re-run whose only remaining items keep failing still writes its outputs);
      else, when some items failed, one warning says how many.

    An item fails after all its retries (:meth:`item_failed`) or at once, when the backend returns
    a per-item failure (a result with an error and no answer, e.g. HTTP 400; see
    :func:`~finegrain.llm.interfaces.is_answered`), which is not retried.
    Transient failures between answers are retried as usual; answers stay in the cache.
    """

    def __init__(self, policy: RetryPolicy, kind: str):
        self.policy, self.kind = policy, kind
        self.n_answered = self.unreachable = self.failed_in_a_row = self.n_failed = self.n_errors = 0
        self.last_error: object = None

    def answered(self, result: Any = None) -> None:
        """A call returned ``result``: the server is there; an answer, or a per-item failure (counted)."""
        self.unreachable = 0
        if result is not None and not is_answered(result):
            self.n_errors, self.last_error = self.n_errors + 1, result.error
            return
        self.n_answered += 1
        self.failed_in_a_row = 0

    def quiet(self, err: RetryableError) -> bool:
        """Whether a retry after ``err`` goes unlogged: no server found yet, so the run soon stops or recovers."""
        return isinstance(err, UnreachableError) and not self.n_answered

    def attempt_failed(self, err: RetryableError) -> None:
        self.unreachable = self.unreachable + 1 if isinstance(err, UnreachableError) else 0
        if not self.n_answered and self.unreachable >= self.policy.max_unreachable:
            raise FatalBackendError(f"{self.kind}: stopped, {self.unreachable} attempts in a row found no server "
                                    f"({err}) and nothing was answered; check --base-url and that the server runs")

    def item_failed(self, err: RetryableError) -> None:
        self.n_failed, self.failed_in_a_row, self.last_error = self.n_failed + 1, self.failed_in_a_row + 1, err
        if self.failed_in_a_row >= self.policy.max_failed_in_a_row:
            raise FatalBackendError(f"{self.kind}: stopped, {self.failed_in_a_row} items in a row failed after "
                                    f"{self.policy.max_retries + 1} attempts each (last: {err}); {self.n_answered} "
                                    "answers are cached: run the same command again once the server works")

    def finish(self, n_items: int, n_cached: int) -> None:
        """End of a run that asked ``n_items`` (and had ``n_cached``): stop if nothing was ever answered, else warn."""
        n_failed = self.n_failed + self.n_errors
        if n_failed and not self.n_answered and not n_cached:
            raise FatalBackendError(f"{self.kind}: every request failed ({n_failed} items, last: "
                                    f"{self.last_error}); nothing was answered")
        if self.n_failed and not self.n_errors:
            log.warning("%s: %d of %d requested items failed after %d attempts each (last: %s); run the same command "
                        "again to retry them (answers are cached)", self.kind, self.n_failed, n_items,
                        self.policy.max_retries + 1, self.last_error)
        elif n_failed:
            how = ([f"{self.n_failed} after {self.policy.max_retries + 1} attempts each"] if self.n_failed else []) \
                + [f"{self.n_errors} with an error that is not retried"]
            log.warning("%s: %d of %d requested items failed: %s (last: %s)", self.kind, n_failed, n_items,
                        ", ".join(how), self.last_error)


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


async def call_with_retries(call: Callable[[Any], Awaitable[Any]], request: Any, policy: RetryPolicy,
                            limiter: RateLimiter, rng: random.Random, *, timeout: float | None,
                            label: str, watch: FailureWatch | None = None) -> tuple[Any, int]:
    """``(result, attempts)``; raises the last RetryableError when all attempts failed.

    ``watch`` sees every answer and failed attempt, and may stop the run (FatalBackendError).
    """
    for attempt in range(policy.max_retries + 1):
        await limiter.acquire()
        try:
            if timeout:
                result = await asyncio.wait_for(call(request), timeout)
            else:
                result = await call(request)
            if watch is not None:
                watch.answered(result)
            return result, attempt + 1
        except asyncio.TimeoutError:
            err = RetryableError(f"timeout: no answer within {timeout:g} s")
        except RetryableError as e:
            err = e
        if watch is not None:
            watch.attempt_failed(err)
        if attempt == policy.max_retries:
            raise err
        delay = backoff_delay(attempt, policy, err.retry_after, rng)
        if err.retry_after:
            limiter.pause_until(time.monotonic() + min(err.retry_after, policy.max_retry_after))
        level = logging.DEBUG if watch is not None and watch.quiet(err) else logging.WARNING
        log.log(level, "%s: %s; retry %d/%d in %.2f s", label, err, attempt + 1, policy.max_retries, delay)
        await asyncio.sleep(delay)
    raise AssertionError("unreachable")


def result_to_json(result: Any) -> dict[str, Any]:
    return dataclasses.asdict(result)


def result_from_json(cls: type, data: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


async def _run(jobs: Sequence[Job], call, *, kind: str, backend, result_cls: type, cache: AnswerCache,
               policy: RetryPolicy, seed: int, desc: str) -> dict[str, Outcome]:
    from ..tracking import progress

    outcomes: dict[str, Outcome] = {}
    todo: dict[str, Job] = {}
    for job in jobs:
        if job.key in outcomes or job.key in todo:
            continue
        hit = cache.get(job.key) if getattr(backend, "cacheable", True) else None
        if hit is not None:
            outcomes[job.key] = Outcome(result_from_json(result_cls, hit), cached=True,
                                        requested_at=hit.get("_requested_at"), answered_at=hit.get("_answered_at"))
        else:
            todo[job.key] = job
    bar = progress(total=len(outcomes) + len(todo), desc=desc)
    bar.update(len(outcomes))
    sem = asyncio.Semaphore(max(1, policy.concurrency))
    limiter = RateLimiter(policy.requests_per_minute)
    rng = random.Random(seed)
    timeout = policy.timeout if getattr(backend, "remote", True) else None
    watch = FailureWatch(policy, kind)
    meta = dict(kind=kind, backend=backend.name, model=backend.model,
                prompt_version=getattr(backend, "prompt_version", "none"))

    async def one(job: Job) -> None:
        async with sem:
            outcomes[job.key] = await _answer(job)
        bar.update(1)

    async def _answer(job: Job) -> Outcome:
        started = _now_iso()
        try:
            result, attempts = await call_with_retries(call, job.request, policy, limiter, rng, timeout=timeout,
                                                       label=f"{kind} {job.item_id}", watch=watch)
        except RetryableError as e:  # not cached: a re-run asks again
            watch.item_failed(e)
            return Outcome(None, attempts=policy.max_retries + 1, error=f"failed: {e}", requested_at=started)
        answered = _now_iso()
        if getattr(backend, "cacheable", True) and is_answered(result):
            cache.put(job.key, in_hash=job.in_hash, item_id=job.item_id,
                      result=dict(result_to_json(result), _requested_at=started, _answered_at=answered), **meta)
        return Outcome(result, attempts=attempts, requested_at=started, answered_at=answered)

    tasks = [asyncio.create_task(one(j)) for j in todo.values()]
    try:
        for fut in asyncio.as_completed(tasks):
            await fut  # a FatalBackendError propagates and cancels the rest below
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    finally:
        bar.close()
    watch.finish(len(todo), len(outcomes) - len(todo))
    return outcomes


def run_calls(jobs: Sequence[Job], call: Callable[[Any], Awaitable[Any]], *, kind: str, backend, result_cls: type,
              cache: AnswerCache, policy: RetryPolicy, seed: int = 0, desc: str = "") -> dict[str, Outcome]:
    """Answer every job (see module docstring); returns ``{job.key: Outcome}``.

    Raises :class:`FatalBackendError` (after cancelling the calls in flight) when a backend
    reports that no request can succeed, or when the run is not getting through (see
    :class:`FailureWatch`); answers received before that stay in the cache.
    """
    async def main():
        try:
            return await _run(jobs, call, kind=kind, backend=backend, result_cls=result_cls, cache=cache,
                              policy=policy, seed=seed, desc=desc or kind)
        finally:
            aclose = getattr(backend, "aclose", None)
            if aclose is not None:
                await aclose()

    return asyncio.run(main())


__all__ = ["RetryPolicy", "Job", "Outcome", "RateLimiter", "FailureWatch", "backoff_delay", "call_with_retries",
           "run_calls", "FatalBackendError"]
