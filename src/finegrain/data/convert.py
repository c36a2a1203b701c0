r"""Converters from public preference datasets to finegrain's pair and edited-pair files.

``convert(source, input_path, output_dir)`` writes ``pairs.jsonl`` (preference pairs),
``edits.jsonl`` (edited pairs, for sources that have edits), ``rejects.jsonl`` (with
``skip_invalid``) and ``convert_summary.json``. Every output record passes the same validation
as :func:`finegrain.data.loaders.load_pairs`; an error names the source file, the source record
and the source field.

Sources (one function each, ``(record, counts, **options) -> Candidate`` iterator):

- ``alpacafarm``: ``instruction``, ``input``, ``output_1``, ``output_2``, ``preference`` (1 or 2).
  Prompt = instruction, plus ``"\n\n" + input`` when input is non-empty.
- ``hh``: Anthropic HH ``chosen``/``rejected`` transcripts. Prompt = their longest common prefix
  cut just after its last ``"\n\nAssistant:"``; responses = the rest of each, minus one leading
  space, so ``prompt + " " + chosen`` is the original transcript (the prompt keeps HH's leading
  ``"\n\nHuman:"``). A response that continues with more turns keeps them, as in the data.
- ``qa-feedback``: FineGrainedRLHF's QA-feedback (ASQA). Six pairwise labels per question over
  predictions (1,2),(1,3),(1,4),(2,3),(2,4),(3,4) give preference pairs (label 0 = tie: dropped
  and counted), ids ``<question_id>:p1>p3``; ``prediction 1`` -> ``corrected-prediction`` gives
  one edited pair per question, id ``<question_id>:edit``, with the human error spans of
  ``prediction 1`` as ``gold_spans`` (``error_spans`` in meta keeps ``[start, end, error type]``,
  ``missing_info`` the missing-information marks). Every record carries ``question_id`` (the
  record's ``question_id`` or ``id``, else ``"q" + sha1(question)[:12]``) and ``gold`` in meta, so
  that splits can be made by question. ``feedback`` may be an object or a Python-literal string
  (parsed with ``ast.literal_eval``, never evaluated). Prompt (``qa_prompt_style``):
  ``"question+passages"`` (default) = ``"Question: ...\n\nPassages:\n[1] title: text\n[2] ..."``,
  ``"passages+question"`` = the passages first, the question last (when a prompt is too long for a
  model, the prompt is cut from its left: the question and the passages nearest it stay), or
  ``"question"``.
- ``oasst``: OpenAssistant message trees. For each prompter message, every two ranked assistant
  replies give a pair (lower ``rank`` = better = chosen); equal ranks are dropped and counted,
  deleted messages skipped. Prompt = the message's text for a first turn, else the
  conversation as ``"User: ...\n\nAssistant: ...\n\nUser: ..."``.
"""
from __future__ import annotations

import ast
import hashlib
import itertools
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import ConfigError, InputError
from ..io import iter_records, write_json, write_jsonl
from .loaders import Candidate, LoadReport, Rejects, check_text, finish_report, iter_checked, located
from .schema import EditedPair

QA_PROMPTS = ("question+passages", "passages+question", "question")
_ASSISTANT = "\n\nAssistant:"


# ---------------------------------------------------------------- alpacafarm

def alpacafarm_prompt(instruction: str, input_text: str | None) -> str:
    """``instruction``, plus a blank line and ``input`` when the input is non-empty."""
    return instruction + ("\n\n" + input_text if input_text and input_text.strip() else "")


def from_alpacafarm(rec: dict, counts: Counter) -> Iterator[Candidate]:
    """One preference pair from an AlpacaFarm record (``preference`` 1 = output_1 preferred)."""
    instruction = check_text(rec.get("instruction"), "instruction")
    input_text = rec.get("input")
    if input_text is not None and not isinstance(input_text, str):
        raise InputError(f"must be a string, got {type(input_text).__name__}", field="input")
    pref = rec.get("preference")
    if isinstance(pref, bool) or pref not in (1, 2):
        got = "missing" if "preference" not in rec else f"got {pref!r}"
        raise InputError(f"must be 1 (output_1 preferred) or 2 (output_2 preferred), {got}", field="preference")
    w, l = (1, 2) if pref == 1 else (2, 1)
    for name in (f"output_{w}", f"output_{l}"):
        if name not in rec:
            raise InputError("missing", field=name)
    out = {"prompt": alpacafarm_prompt(instruction, input_text), "chosen": rec[f"output_{w}"],
           "rejected": rec[f"output_{l}"]}
    out.update({k: v for k, v in rec.items() if k not in ("instruction", "input", "output_1", "output_2",
                                                          "preference")})
    yield Candidate("", out, "preference", {"prompt": "instruction", "chosen": f"output_{w}",
                                            "rejected": f"output_{l}"})


# ---------------------------------------------------------------- Anthropic HH

def split_transcripts(chosen: str, rejected: str) -> tuple[str, str, str]:
    """``(prompt, chosen_response, rejected_response)`` of two HH transcripts; see the module doc."""
    n = len(os.path.commonprefix([chosen, rejected]))
    cut = chosen.rfind(_ASSISTANT, 0, n)
    if cut < 0:
        raise InputError("'chosen' and 'rejected' do not share a prefix ending in '\\n\\nAssistant:' "
                         "(expected Anthropic HH transcripts)", field="rejected")
    cut += len(_ASSISTANT)

    def response(text: str, name: str) -> str:
        rest = text[cut:]
        rest = rest[1:] if rest.startswith(" ") else rest
        if not rest.strip():
            raise InputError("the last Assistant turn is empty", field=name)
        return rest

    return chosen[:cut], response(chosen, "chosen"), response(rejected, "rejected")


def from_hh(rec: dict, counts: Counter) -> Iterator[Candidate]:
    """One preference pair from an HH record of two transcripts."""
    for name in ("chosen", "rejected"):
        if name not in rec:
            raise InputError("missing", field=name)
        check_text(rec[name], name)
    prompt, chosen, rejected = split_transcripts(rec["chosen"], rec["rejected"])
    out = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    out.update({k: v for k, v in rec.items() if k not in ("chosen", "rejected")})
    yield Candidate("", out, "preference")


# ---------------------------------------------------------------- QA-feedback (FineGrainedRLHF)

QA_COMPARED = ((1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4))  # order of the 6 labels in `preference`


def qa_passages_text(passages: Any) -> str:
    """``[1] title: sentence sentence ...`` lines, from passages given as ``[title, sentence, ...]``."""
    if not isinstance(passages, list):
        raise InputError(f"must be a list of passages, got {type(passages).__name__}", field="passages")
    lines = []
    for i, p in enumerate(passages, 1):
        if isinstance(p, str):
            p = [p]
        if not isinstance(p, list) or not p or not all(isinstance(s, str) for s in p):
            raise InputError(f"passage {i} must be a list of strings [title, sentence, ...]", field="passages")
        title, sentences = p[0], p[1:]
        lines.append(f"[{i}] {title}: {' '.join(s.strip() for s in sentences)}" if sentences else f"[{i}] {title}")
    return "\n".join(lines)


def qa_prompt(rec: dict, style: str) -> str:
    """The question alone, or ``Question: ...\\n\\nPassages:\\n[1] title: text ...``."""
    question = check_text(rec.get("question"), "question")
    if style == "question":
        return question
    passages = qa_passages_text(rec.get("passages"))
    if style == "passages+question":  # a left cut of a long prompt keeps the question and the nearest passages
        return f"Passages:\n{passages}\n\nQuestion: {question}"
    return f"Question: {question}\n\nPassages:\n{passages}"


def qa_feedback(rec: dict) -> dict:
    """The ``feedback`` field as a dict (it is often a Python-literal string: parsed, never evaluated)."""
    fb = rec.get("feedback")
    if isinstance(fb, str):
        try:
            fb = ast.literal_eval(fb)
        except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
            raise InputError(f"is not a Python/JSON literal ({type(e).__name__})", field="feedback") from e
    if not isinstance(fb, dict):
        raise InputError(f"must be an object with 'errors' and 'corrected-prediction', got {type(fb).__name__}",
                         field="feedback")
    return fb


def qa_error_spans(errors: Any) -> list[list]:
    """``[[start, end, error type], ...]`` from the feedback's ``errors`` list (spans are checked later)."""
    name = "feedback['errors']"
    if errors is None:
        return []
    if not isinstance(errors, list):
        raise InputError(f"must be a list, got {type(errors).__name__}", field=name)
    out = []
    for i, e in enumerate(errors):
        if not isinstance(e, dict) or "start" not in e or "end" not in e:
            raise InputError(f"error {i} must be an object with 'start' and 'end'", field=name)
        out.append([e["start"], e["end"], e.get("error type")])
    return out


def question_id(rec: dict) -> str:
    qid = rec.get("question_id", rec.get("id"))
    if isinstance(qid, (str, int)) and not isinstance(qid, bool) and str(qid).strip():
        return str(qid)
    question = check_text(rec.get("question"), "question")
    return "q" + hashlib.sha1(question.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def from_qa_feedback(rec: dict, counts: Counter, qa_prompt_style: str = "question+passages") -> Iterator[Candidate]:
    """Up to 6 preference pairs and one edited pair from a QA-feedback record."""
    for name in ("question", "prediction 1", "prediction 2", "prediction 3", "prediction 4", "preference",
                 "feedback"):
        if name not in rec:
            raise InputError("missing (is this FineGrainedRLHF's qa_feedback format?)", field=name)
    prompt = qa_prompt(rec, qa_prompt_style)
    qid = question_id(rec)
    labels = rec.get("preference")
    if (not isinstance(labels, list) or len(labels) != len(QA_COMPARED)
            or any(isinstance(x, bool) or x not in (0, 1, 2) for x in labels)):
        raise InputError("must be a list of 6 labels in {0, 1, 2} for predictions "
                         "(1,2),(1,3),(1,4),(2,3),(2,4),(3,4)", field="preference")
    fb = qa_feedback(rec)
    spans = qa_error_spans(fb.get("errors"))
    meta = {"question_id": qid, "source": "qa-feedback"}
    if isinstance(rec.get("gold"), str):
        meta["gold"] = rec["gold"]  # the reference answer, for evaluation
    for (a, b), label in zip(QA_COMPARED, labels):
        if label == 0:
            counts["ties_dropped"] += 1
            continue
        w, l = (a, b) if label == 1 else (b, a)
        out = {"id": f"{qid}:p{w}>p{l}", "prompt": prompt, "chosen": rec.get(f"prediction {w}"),
               "rejected": rec.get(f"prediction {l}"), **meta}
        yield Candidate("", out, "preference", {"prompt": "question", "chosen": f"prediction {w}",
                                                "rejected": f"prediction {l}"})
    edit = {"id": f"{qid}:edit", "prompt": prompt, "rejected": rec.get("prediction 1"),
            "edited": fb.get("corrected-prediction"), "gold_spans": [s[:2] for s in spans],
            "edit_meta": {"editor": "human", "source": "qa-feedback"},
            **meta, "error_spans": spans, "missing_info": fb.get("missing-info", [])}
    yield Candidate("", edit, "edit", {"prompt": "question", "rejected": "prediction 1",
                                       "edited": "feedback['corrected-prediction']",
                                       "gold_spans": "feedback['errors']"})


# ---------------------------------------------------------------- OpenAssistant trees

def oasst_prompt(turns: list[str]) -> str:
    """The text of a first turn, else ``User: ...\\n\\nAssistant: ...\\n\\nUser: ...``."""
    if len(turns) == 1:
        return turns[0]
    return "\n\n".join(f"{'User' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


def _message(m: Any, where: str) -> dict:
    """``m`` if it is a usable message (text, replies list, integer or null rank); deleted ones need no text."""
    if not isinstance(m, dict):
        raise InputError(f"must be a message object, got {type(m).__name__}", field=where)
    if not m.get("deleted"):
        check_text(m.get("text"), f"{where}.text")
    replies = m.get("replies", [])
    if not isinstance(replies, list):
        raise InputError(f"must be a list, got {type(replies).__name__}", field=f"{where}.replies")
    rank = m.get("rank")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
        raise InputError(f"must be an integer or null, got {rank!r}", field=f"{where}.rank")
    return m


def from_oasst(rec: dict, counts: Counter) -> Iterator[Candidate]:
    """Pairs of ranked sibling assistant replies, for every prompter message of one tree."""
    tree = rec.get("message_tree_id")
    stack = [(_message(rec.get("prompt"), "prompt"), "prompt", [])]
    while stack:
        msg, where, history = stack.pop()
        if msg.get("deleted"):
            counts["deleted_skipped"] += 1
            continue
        turns = history + [msg["text"]]
        replies = [(_message(r, f"{where}.replies[{i}]"), f"{where}.replies[{i}]")
                   for i, r in enumerate(msg.get("replies", []))]
        stack.extend((r, w, turns) for r, w in reversed(replies))
        if msg.get("role") != "prompter":
            continue
        ranked = sorted(((r, w) for r, w in replies if r.get("rank") is not None and not r.get("deleted")),
                        key=lambda rw: rw[0]["rank"])
        shared = {rank for rank, n in Counter(r["rank"] for r, _ in ranked).items() if n > 1}
        for (c, cw), (j, jw) in itertools.combinations(ranked, 2):
            if c["rank"] == j["rank"]:
                counts["ties_dropped"] += 1
                continue
            mid = msg.get("message_id", where)
            # a rank two siblings share names its pairs ambiguously: those pairs are named by the replies instead
            name = (f"r{c['rank']}>r{j['rank']}" if not {c["rank"], j["rank"]} & shared else
                    f"{c.get('message_id', cw)}>{j.get('message_id', jw)}")
            out = {"id": f"{mid}:{name}", "prompt": oasst_prompt(turns), "chosen": c["text"],
                   "rejected": j["text"], "message_tree_id": tree, "parent_id": mid, "turns": len(turns),
                   "chosen_id": c.get("message_id"), "rejected_id": j.get("message_id"),
                   "chosen_rank": c["rank"], "rejected_rank": j["rank"], "lang": msg.get("lang")}
            yield Candidate("", out, "preference", {"prompt": f"{where}.text", "chosen": f"{cw}.text",
                                                    "rejected": f"{jw}.text"})


# ---------------------------------------------------------------- driver

SOURCES: dict[str, Callable[..., Iterator[Candidate]]] = {
    "alpacafarm": from_alpacafarm, "hh": from_hh, "qa-feedback": from_qa_feedback, "oasst": from_oasst}
SOURCE_OPTIONS = {"qa-feedback": {"qa_prompt_style": QA_PROMPTS}}


def _check_options(source: str, options: dict[str, Any]) -> dict[str, Any]:
    if source not in SOURCES:
        raise ConfigError(f"unknown source {source!r}: use one of {', '.join(SOURCES)}")
    allowed = SOURCE_OPTIONS.get(source, {})
    for k, v in options.items():
        if k not in allowed:
            raise ConfigError(f"option {k!r} does not apply to source {source!r}"
                              + (f" (options: {', '.join(allowed)})" if allowed else ""))
        if v not in allowed[k]:
            raise ConfigError(f"option {k!r}: {v!r} is not one of {list(allowed[k])}")
    return options


def convert(source: str, input_path: str | os.PathLike, output_dir: str | os.PathLike, *,
            skip_invalid: bool = False, **options: Any) -> dict[str, Any]:
    """Convert ``input_path`` (a ``source`` dataset) into pair files under ``output_dir``; return the summary.

    Options: ``qa_prompt_style`` (qa-feedback: ``"question+passages"`` (default) or
    ``"question"``). With ``skip_invalid`` bad source records (or the bad pairs derived from them)
    go to ``rejects.jsonl`` with the error and are counted; else the first raises ``InputError``.
    """
    options = _check_options(source, options)
    fn = SOURCES[source]
    start = time.perf_counter()
    path, out = str(input_path), Path(output_dir)
    report = LoadReport([], path, source)
    reject = Rejects(skip_invalid, report)
    counts: Counter = Counter()

    def unreadable(err: InputError, raw: Any) -> None:
        report.n_records += 1
        reject(err, raw)

    def candidates() -> Iterator[Candidate]:
        from ..tracking import progress

        for location, rec in progress(iter_records(path, on_error=unreadable), desc=f"convert {source}"):
            report.n_records += 1
            try:
                made = list(fn(rec, counts, **options))
            except InputError as e:
                reject(located(e, path, location), rec, location)
                continue
            yield from (c._replace(location=location, source=rec) for c in made)

    pairs = report.pairs = list(iter_checked(path, candidates(), report, reject))
    finish_report(report, reject, None, default_rejects=str(out / "rejects.jsonl"))
    edits = [p for p in pairs if isinstance(p, EditedPair)]
    prefs = [p for p in pairs if not isinstance(p, EditedPair)]
    files = {"pairs": str(out / "pairs.jsonl")}
    write_jsonl(files["pairs"], (p.to_json() for p in prefs))
    if edits or source == "qa-feedback":
        files["edits"] = str(out / "edits.jsonl")
        write_jsonl(files["edits"], (p.to_json() for p in edits))
    if report.rejects_path:
        files["rejects"] = report.rejects_path
    elif (out / "rejects.jsonl").exists():  # left by an earlier run of this output directory
        (out / "rejects.jsonl").unlink()
    summary = {"source": source, "input": path, "options": options, "n_records": report.n_records,
               "n_pairs": len(prefs), "n_edits": len(edits), "n_rejected": report.n_rejected,
               "n_ties_dropped": counts["ties_dropped"], "n_unchanged_edits_dropped": report.n_unchanged,
               "n_spans_merged": report.n_spans_merged, "rejected_by_field": dict(report.errors),
               **({"n_deleted_skipped": counts["deleted_skipped"]} if source == "oasst" else {}),
               "outputs": files, "seconds": round(time.perf_counter() - start, 3)}
    files["summary"] = str(out / "convert_summary.json")
    write_json(files["summary"], summary)
    return summary


__all__ = ["QA_COMPARED", "QA_PROMPTS", "SOURCES", "alpacafarm_prompt", "convert", "oasst_prompt",
           "qa_passages_text", "split_transcripts"]
