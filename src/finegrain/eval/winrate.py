"""``winrate(cfg)``: pairwise win rate of model outputs against reference outputs (``finegrain winrate``).

Outputs and references are AlpacaEval model-outputs files (``instruction``, ``output``,
``generator``; .json list or .jsonl), matched by instruction (plus ``input`` when present; ``prompt``
for records without an instruction). An instruction twice in the outputs, or twice with different
outputs in the references, is an error.
Each pair is shown to a pairwise judge (:func:`finegrain.llm.backends.get_judge`, default
prompt ``pairwise_judge_v1``) in a random order drawn per example from ``sha256(seed,
instruction)``, so it is reproducible, independent of file order, and the same on a re-run
(which the cache then answers). The order is recorded and undone before scoring.

Scoring follows AlpacaEval: in each annotation ``output_1`` is the reference and ``output_2``
the model; ``preference`` is 1 (reference better), 2 (model better) or 1.5 (tie). With
``s_i = preference_i - 1`` in {0, 0.5, 1} over the n judged examples,

    win_rate = mean(s) = (wins + ties / 2) / n,     se = std(s, ddof=1) / sqrt(n)

(fractions in the JSON; percent in the leaderboard CSV, as AlpacaEval's leaderboard). Examples
the judge could not answer (or answered with a preference outside [1, 2]) are counted as ``n_failed``
and left out of n; a run that judged no example stops with an error before writing anything (the
leaderboard keeps its row).

Writes: ``--output FILE.json`` (the summary), ``FILE.annotations.json`` (AlpacaEval's
annotations format plus ``judge_order``, ``raw_preference``, ``id``) and a leaderboard CSV
(name, win_rate, standard_error, n_wins, n_draws, n_total, avg_length), one row per name,
updated in place when several models are compared into the same file (columns a user added are
kept; a file without ``name`` and ``win_rate`` columns is refused before any judging).
"""
from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

from ..config import opt, to_dict
from ..errors import ConfigError, InputError
from ..io import atomic_write, exclusive_lock, iter_records, write_json
from ..llm.backends import BACKEND_NAMES, FatalBackendError, JudgeRequest, JudgeResult, backend_spec, get_judge
from ..llm.calls import LLMCallConfig, make_job, output_base, resolve_cache_path, run_cached, usage_summary
from .generate import prompt_of

LEADERBOARD_FIELDS = ["name", "win_rate", "standard_error", "n_wins", "n_draws", "n_total", "avg_length"]


@dataclass
class WinrateConfig(LLMCallConfig):
    outputs: str = opt(help="model outputs (AlpacaEval format: instruction, output, generator; .json or .jsonl)")
    reference: str = opt(help="reference outputs in the same format, e.g. text_davinci_003 outputs")
    judge: str = opt(help="who judges", choices=BACKEND_NAMES)
    output: str = opt(help="summary JSON; annotations and leaderboard CSV are written beside it")
    judge_model: str | None = opt(None, "judge model (anthropic/openai/hf), judgements file (file); sandbox: its "
                                        "judge name (default 'gold')")
    prompt: str = opt("pairwise_judge_v1", "packaged judge prompt version or path of a prompt .txt file")
    name: str | None = opt(None, "name of the compared model (default: the outputs' generator field)")
    leaderboard: str | None = opt(None, "leaderboard CSV to create or update (default: OUTPUT_BASE.leaderboard.csv)")
    skip_missing: bool = opt(False, "skip outputs without a reference (default: stop with an error)")
    limit: int | None = opt(None, "only the first N outputs", ge=1)

    def validate(self) -> None:
        self.check_llm()
        if self.judge_model is None and backend_spec(self.judge).default_judge_model is None:
            raise ConfigError(f"--judge-model is required for --judge {self.judge}")
        paths = self.paths()
        self.check_outputs(self.output, (paths["annotations"], "the annotations beside --output"),
                           (paths["leaderboard"], "--leaderboard" if self.leaderboard else
                            "the leaderboard beside --output"))

    def paths(self) -> dict[str, str]:
        """The files a run writes: the summary (``output``), the annotations and the leaderboard."""
        base = output_base(self.output)
        return {"output": self.output, "annotations": base + ".annotations.json",
                "leaderboard": self.leaderboard or base + ".leaderboard.csv"}


@dataclass
class Example:
    id: str
    key: str          # instruction (+ input): what matches an output with its reference
    instruction: str  # what the judge sees
    output: str
    reference: str
    generator: str
    reference_generator: str
    model_first: bool  # the judge saw the model's output as output_1
    extra: dict


def match_key(rec: dict, path: str, where: str) -> str:
    """What matches an output with its reference: ``instruction`` (+ blank line + ``input``), as in AlpacaEval,
    also when the record has a ``prompt`` too (generate keeps a prompts file's fields); ``prompt`` without one."""
    return prompt_of({k: v for k, v in rec.items() if k != "prompt"} if "instruction" in rec else rec, path, where)


def read_outputs(path: str, limit: int | None = None) -> list[tuple[str, dict, str]]:
    """``(location, record, key)`` of each record, with ``output`` checked."""
    out = []
    for where, rec in iter_records(path):
        key = match_key(rec, path, where)
        if not isinstance(rec.get("output"), str):
            raise InputError("must be a string", path=path, record=where, field="output")
        out.append((where, rec, key))
        if limit and len(out) >= limit:
            break
    if not out:
        raise InputError("no outputs (the file is empty)", path=path)
    return out


def model_shown_first(seed: int, key: str) -> bool:
    """The seeded coin of one example: True when the judge sees the model's output first."""
    return hashlib.sha256(f"{seed}\0{key}".encode()).digest()[0] % 2 == 1


def match_examples(cfg: WinrateConfig) -> list[Example]:
    outputs = read_outputs(cfg.outputs, cfg.limit)
    refs: dict[str, dict] = {}
    first_at: dict[str, str] = {}
    for where, rec, key in read_outputs(cfg.reference):
        ref = refs.setdefault(key, rec)
        first_at.setdefault(key, where)
        if ref["output"] != rec["output"]:  # which one would be judged is anyone's guess
            raise InputError(f"duplicate instruction with another output than at {first_at[key]} (keep one "
                             "reference output per instruction)", path=cfg.reference, record=where, field="instruction")
    ref_name = os.path.splitext(os.path.basename(cfg.reference))[0]
    examples, missing, seen = [], [], set()
    for where, rec, key in outputs:
        if key in seen:
            raise InputError("duplicate instruction (each instruction is judged once)", path=cfg.outputs,
                             record=where, field="instruction")
        seen.add(key)
        ref = refs.get(key)
        if ref is None:
            missing.append((where, key))
            continue
        ex_id = str(rec["id"]) if rec.get("id") is not None else "i" + hashlib.sha1(key.encode()).hexdigest()[:16]
        examples.append(Example(ex_id, key, key, rec["output"], ref["output"], str(rec.get("generator") or "model"),
                                str(ref.get("generator") or ref_name), model_shown_first(cfg.seed, key),
                                {k: rec[k] for k in ("dataset",) if k in rec}))
    if missing and not cfg.skip_missing:
        where, key = missing[0]
        raise InputError(f"{len(missing)} output(s) have no reference with the same instruction in {cfg.reference} "
                         f"(first: {key[:60]!r}); use --skip-missing to judge the others", path=cfg.outputs,
                         record=where, field="instruction")
    if not examples:
        raise InputError("no output matches a reference instruction", path=cfg.outputs)
    return examples


def judge_request(ex: Example) -> JudgeRequest:
    first, second = (ex.output, ex.reference) if ex.model_first else (ex.reference, ex.output)
    return JudgeRequest(ex.id, ex.instruction, first, second)


def canonical_preference(raw: float, model_first: bool) -> float:
    """The judge's preference about (shown 1, shown 2) as AlpacaEval's (reference, model)."""
    return 3.0 - raw if model_first else raw


def winrate_stats(preferences: Sequence[float]) -> dict[str, Any]:
    """Win rate of output_2 (the model) from AlpacaEval preferences (1, 1.5, 2); see module docstring."""
    s = [p - 1.0 for p in preferences]
    n = len(s)
    mean = sum(s) / n if n else float("nan")
    var = sum((x - mean) ** 2 for x in s) / (n - 1) if n > 1 else float("nan")
    return {"win_rate": mean, "se": math.sqrt(var / n) if n > 1 else float("nan"), "n": n,
            "n_wins": sum(1 for x in s if x == 1.0), "n_draws": sum(1 for x in s if x == 0.5),
            "n_losses": sum(1 for x in s if x == 0.0)}


def _annotation(ex: Example, outcome, backend) -> dict[str, Any]:
    res = outcome.result
    answer = res.preference if res is not None and res.error is None else None
    raw = float(answer) if isinstance(answer, (int, float)) and not isinstance(answer, bool) \
        and 1.0 <= answer <= 2.0 else None
    invalid = res is not None and res.error is None and raw is None  # a backend's bug, e.g. NaN, 0 or 3: not scored
    pref = canonical_preference(raw, ex.model_first) if raw is not None else None
    return {"instruction": ex.instruction, "output_1": ex.reference, "generator_1": ex.reference_generator,
            "output_2": ex.output, "generator_2": ex.generator, "preference": pref,
            "annotator": f"{backend.name}:{backend.model}:{getattr(backend, 'prompt_version', 'none')}",
            "raw_completion": res.raw if res is not None else None,
            "judge_order": "model_first" if ex.model_first else "reference_first", "raw_preference": raw,
            "id": ex.id, "cached": outcome.cached,
            "error": outcome.error or (res.error if res is not None else None)
            or (f"invalid preference {res.preference!r} (a judge answers 1, 2 or 1.5)" if invalid else None),
            **ex.extra}


def _win_rate_of(value: Any) -> float | None:
    """A leaderboard cell's win rate; None when empty or not finite."""
    x = float(value) if value not in (None, "") else math.nan
    return x if math.isfinite(x) else None


def read_leaderboard(path: str) -> tuple[list[str], list[dict[str, Any]]]:
    """The columns (ours first, then any the file adds) and rows of the leaderboard CSV at ``path`` (none yet: no
    rows), checked, so that a file that is not one stops the run before any judging, not after it."""
    if not os.path.exists(path):
        return list(LEADERBOARD_FIELDS), []
    try:  # utf-8-sig: a spreadsheet's BOM would otherwise hide the 'name' column
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            rows = []
            for r in reader:
                rows.append(r)
                try:
                    _win_rate_of(r.get("win_rate"))
                except ValueError:
                    raise InputError(f"must be a number (percent) or empty, got {r.get('win_rate')!r}", path=path,
                                     record=f"line {reader.line_num}", field="win_rate") from None
    except (UnicodeDecodeError, csv.Error, OSError) as e:
        raise InputError(f"cannot read the leaderboard CSV: {e}", path=path) from e
    missing = [c for c in ("name", "win_rate") if c not in columns] if columns else []
    if missing:
        raise InputError(f"not a leaderboard CSV: no {missing[0]!r} column (columns: {', '.join(columns)}); "
                         "give another --leaderboard", path=path)
    return list(LEADERBOARD_FIELDS) + [c for c in columns if c not in LEADERBOARD_FIELDS], rows


def update_leaderboard(path: str, row: dict[str, Any]) -> list[dict[str, Any]]:
    """Replace or add ``row`` (by name) in the CSV at ``path``; rows sorted by win rate, written atomically.
    Columns the file has besides ours are kept. Runs that update one leaderboard at the same time take turns
    (an OS lock on ``PATH.lock``), so none loses another's row."""
    with exclusive_lock(f"{path}.lock", path, wait=True):
        return _update_leaderboard(path, row)


def _update_leaderboard(path: str, row: dict[str, Any]) -> list[dict[str, Any]]:
    columns, rows = read_leaderboard(path)
    rows = [r for r in rows if r.get("name") != row["name"]]
    rows.append({k: row[k] for k in LEADERBOARD_FIELDS})
    rows.sort(key=lambda r: -x if (x := _win_rate_of(r["win_rate"])) is not None else math.inf)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    with atomic_write(path) as f:
        f.write(buf.getvalue())
    return rows


def _nan_to_none(x: float) -> float | None:
    return None if isinstance(x, float) and math.isnan(x) else round(x, 6)


def winrate(cfg: WinrateConfig) -> dict[str, Any]:
    """Judge every matched example, write annotations, leaderboard and summary; return the summary."""
    t0 = time.time()
    examples = match_examples(cfg)
    read_leaderboard(cfg.paths()["leaderboard"])  # a file that is not one stops the run here, before any judging
    judge_model = cfg.judge_model or backend_spec(cfg.judge).default_judge_model
    backend = get_judge(cfg.judge, judge_model, **cfg.backend_kwargs(cfg.judge, cfg.prompt))
    version = getattr(backend, "prompt_version", "none")
    requests = [judge_request(ex) for ex in examples]
    jobs = [make_job("judge", backend, ex.id, r, r.instruction, r.output_1, r.output_2)
            for ex, r in zip(examples, requests)]
    cache_path = resolve_cache_path(cfg.cache, cfg.output, backend)
    price = cfg.price(cfg.judge, judge_model)
    outcomes = run_cached(jobs, backend.judge, kind="judge", backend=backend, result_cls=JudgeResult,
                          cache_path=cache_path, policy=cfg.retry_policy(), seed=cfg.seed, desc=f"judge ({cfg.judge})")
    annotations = [_annotation(ex, outcomes[j.key], backend) for ex, j in zip(examples, jobs)]
    prefs = [a["preference"] for a in annotations if a["preference"] is not None]
    paths = cfg.paths()
    if not prefs:  # a row of empty values would replace the model's row in the leaderboard
        first = next((a["error"] for a in annotations if a["error"]), None)
        raise FatalBackendError(f"judge: no example was judged ({len(annotations)} examples, first error: {first}); "
                                f"nothing was written (the leaderboard {paths['leaderboard']} is unchanged)")
    stats = winrate_stats(prefs)
    name = cfg.name or examples[0].generator
    avg_length = round(sum(len(ex.output) for ex in examples) / len(examples))
    write_json(paths["annotations"], annotations)
    update_leaderboard(paths["leaderboard"], {
        "name": name, "win_rate": _nan_to_none(100 * stats["win_rate"]), "standard_error": _nan_to_none(100 * stats["se"]),
        "n_wins": stats["n_wins"], "n_draws": stats["n_draws"], "n_total": stats["n"], "avg_length": avg_length})
    summary = {
        **usage_summary(price, jobs, outcomes),  # n_failed below overrides its count of failed calls
        "win_rate": _nan_to_none(stats["win_rate"]), "se": _nan_to_none(stats["se"]), "n": stats["n"],
        "n_wins": stats["n_wins"], "n_draws": stats["n_draws"], "n_losses": stats["n_losses"],
        "n_failed": len(annotations) - len(prefs), "n_examples": len(examples), "name": name,
        "reference": examples[0].reference_generator, "avg_length": avg_length,
        "n_model_first": sum(ex.model_first for ex in examples),
        "judge": cfg.judge, "judge_model": judge_model, "prompt_version": version,
        "cache": cache_path, **paths, "elapsed_s": round(time.time() - t0, 3),
        "config": {k: v for k, v in to_dict(cfg).items() if k != "backend_options"},
    }
    write_json(cfg.output, summary)
    return summary
