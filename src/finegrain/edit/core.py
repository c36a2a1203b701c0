"""``edit_pairs(cfg)``: minimally edit the rejected response of every pair (``finegrain edit``).

Reads preference pairs, asks an editor backend for a minimal edit of each ``rejected``
response (through the cache, see :mod:`finegrain.llm.runner`), applies the guards of
:mod:`finegrain.edit.guards` and writes, atomically and at the end:

- ``OUTPUT``: edited pairs (the pair's fields + ``edited`` + ``edit_meta``), in input order;
- ``OUTPUT_BASE.rejects.jsonl``: one row per pair without an accepted edit, with ``reason``;
- ``OUTPUT_BASE.summary.json``: counts, rejects by reason, tokens, cost, edit-ratio percentiles.

Every answer is committed to the SQLite cache as it arrives, so after a crash or Ctrl-C the
same command resumes: answered pairs are served from the cache, never requested again, and
the output holds each pair exactly once. One run at a time writes an output: a second one on
the same output refuses (an OS lock on ``OUTPUT_BASE.lock``, released when its process ends).
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from ..config import opt, to_dict
from ..errors import ConfigError
from ..io import exclusive_lock, write_json, write_jsonl
from ..llm.backends import BACKEND_NAMES, EditRequest, EditResult, get_editor
from ..llm.calls import LLMCallConfig, make_job, output_base, resolve_cache_path, run_cached, usage_summary
from ..llm.runner import Job
from .distance import percentiles
from .guards import DEFAULT_MAX_EDIT_RATIO, GuardConfig, check_edit


@dataclass
class EditConfig(LLMCallConfig):
    data: str = opt(help="preference pairs to edit (prompt, chosen, rejected[, id]): .jsonl/.json/.parquet or a "
                         "datasets name")
    output: str = opt(help="edited pairs JSONL; rejects and summary are written beside it")
    backend: str = opt(help="who edits", choices=BACKEND_NAMES)
    model: str = opt(help="model name (anthropic/openai), local model path (hf), human-edits file (file) or sandbox "
                          "editor name (sandbox)")
    prompt: str = opt("minimal_edit_v1", "packaged prompt version or path of a prompt .txt file")
    max_edit_ratio: float = opt(DEFAULT_MAX_EDIT_RATIO, "reject edits whose token edit ratio exceeds this (0.75 = "
                                                        "p90 of human corrections in QA-Feedback)")
    allow_unchanged: bool = opt(False, "accept an answer identical to the original (default: reject as 'unchanged')")
    skip_invalid: bool = opt(False, "skip invalid input records (written to DATA.rejects.jsonl) instead of stopping")
    limit: int | None = opt(None, "edit only the first N pairs")

    def validate(self) -> None:
        self.check_llm()
        if not 0 < self.max_edit_ratio <= 1:
            raise ConfigError("--max-edit-ratio must be in (0, 1]")
        if self.limit is not None and self.limit < 1:
            raise ConfigError("--limit must be at least 1")
        base = output_base(self.output)
        self.check_outputs(self.output, (base + ".rejects.jsonl", "the rejects file beside --output"),
                           (base + ".summary.json", "the summary beside --output"),
                           (base + ".lock", "the lock file beside --output"))


def _edit_meta(backend, outcome, stats: dict[str, Any] | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"backend": backend.name, "model": backend.model,
                            "prompt_version": getattr(backend, "prompt_version", "none")}
    meta.update(stats or {})
    meta.update(requested_at=outcome.requested_at, answered_at=outcome.answered_at, cached=outcome.cached,
                input_tokens=getattr(outcome.result, "input_tokens", 0) if outcome.result else 0,
                output_tokens=getattr(outcome.result, "output_tokens", 0) if outcome.result else 0)
    return meta


def _jobs(pairs, backend) -> list[Job]:
    return [make_job("edit", backend, p.id, EditRequest(p.id, p.prompt, p.rejected, dict(p.meta)),
                     p.prompt, p.rejected) for p in pairs]


def edit_pairs(cfg: EditConfig) -> dict[str, Any]:
    """Edit every pair of ``cfg.data``; write edited pairs, rejects and summary; return the summary."""
    from ..data.loaders import load_pairs_report

    t0, started = time.time(), datetime.now(timezone.utc).isoformat(timespec="seconds")
    report = load_pairs_report(cfg.data, "preference", skip_invalid=cfg.skip_invalid)
    pairs = report.pairs[: cfg.limit] if cfg.limit else report.pairs
    backend = get_editor(cfg.backend, cfg.model, **cfg.backend_kwargs(cfg.backend, cfg.prompt))
    check_ids = getattr(backend, "check_ids", None)
    if check_ids is not None:  # human edits must each belong to a pair of the data
        check_ids({p.id for p in report.pairs}, cfg.data, skip_invalid=cfg.skip_invalid)
    price = cfg.price(cfg.backend, cfg.model)
    with exclusive_lock(output_base(cfg.output) + ".lock", cfg.output):
        return _edit_and_write(cfg, report, pairs, backend, price, t0, started)


def _edit_and_write(cfg: EditConfig, report, pairs, backend, price, t0: float, started: str) -> dict[str, Any]:
    """Ask for every edit (through the cache), apply the guards, write the three outputs; the summary."""
    cache_path = resolve_cache_path(cfg.cache, cfg.output, backend)
    jobs = _jobs(pairs, backend)
    outcomes = run_cached(jobs, backend.edit, kind="edit", backend=backend, result_cls=EditResult,
                          cache_path=cache_path, policy=cfg.retry_policy(), seed=cfg.seed, desc=f"edit ({cfg.backend})")
    guard = GuardConfig(cfg.max_edit_ratio, cfg.allow_unchanged)
    accepted, rejects, reasons, ratios = [], [], Counter(), []
    item_meta = getattr(backend, "item_meta", None)
    item_spans = getattr(backend, "item_gold_spans", None)
    for pair, job in zip(pairs, jobs):
        outcome = outcomes[job.key]
        res = outcome.result
        reason, stats = check_edit(pair.rejected, res.text if res else None,
                                   outcome.error if res is None else res.error, guard)
        meta = _edit_meta(backend, outcome, stats)
        if item_meta is not None:
            meta.update(item_meta(pair.id))
        if reason is None:
            ratios.append(stats["edit_ratio"])
            accepted.append(_edited_row(pair, res.text, meta, item_spans(pair.id) if item_spans else None))
        else:
            reasons[reason] += 1
            rejects.append({"id": pair.id, "reason": reason, "error": outcome.error or (res.error if res else None),
                            "prompt": pair.prompt, "rejected": pair.rejected,
                            "answer": (res.text if res and res.text is not None else (res.raw if res else None)),
                            "edit_meta": meta})
    base = output_base(cfg.output)
    paths = {"output": cfg.output, "rejects": base + ".rejects.jsonl", "summary": base + ".summary.json"}
    write_jsonl(paths["output"], accepted)
    write_jsonl(paths["rejects"], rejects)
    summary = {
        "n_pairs": len(pairs), "n_edited": len(accepted), "n_rejected": len(rejects),
        "rejects_by_reason": dict(sorted(reasons.items())),
        "edit_ratio": dict(percentiles(ratios, (10, 50, 90)), mean=round(sum(ratios) / len(ratios), 4) if ratios else None),
        **usage_summary(price, jobs, outcomes),
        "backend": cfg.backend, "model": cfg.model, "prompt_version": getattr(backend, "prompt_version", "none"),
        "input": report.summary(), "cache": cache_path, **paths,
        "started_at": started, "elapsed_s": round(time.time() - t0, 3),
        "config": {k: v for k, v in to_dict(cfg).items() if k != "backend_options"},
    }
    if hasattr(backend, "unused_ids"):
        summary["n_unmatched_human_edits"] = len(backend.unused_ids())
    write_json(paths["summary"], summary)
    return summary


def _edited_row(pair, edited: str, meta: dict[str, Any], gold_spans: list | None = None) -> dict[str, Any]:
    from ..data.schema import EditedPair

    return EditedPair(pair.prompt, pair.chosen, pair.rejected, pair.id, dict(pair.meta), edited=edited,
                      edit_meta=meta, gold_spans=gold_spans).to_json()


__all__ = ["EditConfig", "edit_pairs"]
