"""``generate(cfg)``: a checkpoint's outputs for a prompt set (``finegrain generate``).

Prompts are records with a ``prompt`` or an ``instruction`` field (AlpacaEval / AlpacaFarm:
``instruction`` plus an optional ``input``, appended after a blank line). Outputs are written
in AlpacaEval's model-outputs format: each input record with ``output`` and ``generator``
added, as a JSON list (``.json``, what AlpacaEval reads) or JSON lines (``.jsonl``), atomically.
Generation uses :func:`finegrain.generation.generate_texts` (the chat template when the
tokenizer has one, batched, seeded). Until the output is written, every generated batch is kept
in ``OUTPUT.partial.jsonl`` (:class:`PartialOutputs`): a re-run with the same settings resumes
from it, with the outputs an uninterrupted run gives.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from ..config import ModelOptions, PrecisionOptions, check_template, opt
from ..errors import ConfigError, InputError
from ..io import iter_records, write_json, write_jsonl

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class GenerateConfig(ModelOptions, PrecisionOptions):
    """One output per prompt from a causal LM checkpoint; throughput grows with ``batch_size`` and a
    16-bit ``dtype`` (measured in benchmarks/RESULTS.md)."""

    model: str = opt(help="causal LM checkpoint directory (or hub / short name)")
    prompts: str = opt(help="prompt records with 'prompt' or 'instruction' (+ optional 'input'): .json/.jsonl/...")
    output: str = opt(help="outputs file: .json (AlpacaEval's list format) or .jsonl")
    generator: str | None = opt(None, "name recorded in each output's 'generator' (default: the model directory's "
                                      "name; for a run's OUTPUT/final, OUTPUT's name)")
    batch_size: int = opt(16, "prompts generated together (more rows cost little extra time per token; "
                              "the KV cache grows with them)")
    max_new_tokens: int = opt(512, "longest output in tokens")
    temperature: float = opt(0.7, "sampling temperature (0 = greedy)")
    top_p: float = opt(1.0, "nucleus sampling mass")
    max_prompt_tokens: int | None = opt(None, "keep only the last N prompt tokens", ge=1)
    template: str | None = opt(None, "prompt template with {prompt} (default: the tokenizer's chat template)")
    seed: int = opt(0, "sampling seed", ge=0)
    limit: int | None = opt(None, "only the first N prompts", ge=1)
    device: str | None = opt(None, "torch device (default: cuda if available, else cpu)")

    def validate(self) -> None:
        super().validate()
        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError("--temperature must be >= 0 and --top-p in (0, 1]")
        check_template(self.template, "--template")
        if not (self.output.endswith(".json") or self.output.endswith(".jsonl")):
            raise ConfigError("--output must end with .json (AlpacaEval list) or .jsonl")


def prompt_of(rec: dict, path: str, where: str) -> str:
    """The text a model is asked: ``prompt``, else ``instruction`` (+ blank line + ``input`` if any)."""
    for name in ("prompt", "instruction"):
        if name in rec:
            text = rec[name]
            if not isinstance(text, str) or not text.strip():
                raise InputError("must be a non-empty string", path=path, record=where, field=name)
            extra = rec.get("input") if name == "instruction" else None
            if extra is not None and not isinstance(extra, str):
                raise InputError("must be a string", path=path, record=where, field="input")
            return f"{text}\n\n{extra}" if extra and extra.strip() else text
    raise InputError("no 'prompt' or 'instruction' field", path=path, record=where)


def default_generator(model: str) -> str:
    """The model directory's name, or for ``OUTPUT/final`` (where ``ppo`` saves every run's policy) ``OUTPUT``'s:
    winrate names a model by it, and a leaderboard keeps one row per name.

    >>> default_generator("runs/ppo-token/final/"), default_generator("HuggingFaceTB/SmolLM2-135M-Instruct")
    ('ppo-token', 'SmolLM2-135M-Instruct')
    """
    path = os.path.normpath(model)
    name, parent = os.path.basename(path), os.path.basename(os.path.dirname(os.path.abspath(path)))
    return parent if name == "final" and parent else name


def read_prompts(path: str, limit: int | None = None) -> list[tuple[dict, str]]:
    """``(record, prompt text)`` for each record of ``path``, validated."""
    out = []
    for where, rec in iter_records(path):
        out.append((rec, prompt_of(rec, path, where)))
        if limit and len(out) >= limit:
            break
    if not out:
        raise InputError("no prompts (the file is empty)", path=path)
    return out


# settings that change nothing a prompt's output depends on
_NOT_SAMPLING = ("output", "generator", "device", "limit", "prompts")


def settings_fingerprint(cfg: GenerateConfig, prompts: Sequence[str]) -> str:
    """A hash of everything the outputs depend on: the prompts, the sampling settings, and the model (its
    name, and for a local directory each file's name, size and modification time)."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in _NOT_SAMPLING}
    model = Path(cfg.model)
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in model.iterdir() if f.is_file()) \
        if model.is_dir() else []
    blob = json.dumps([settings, files, list(prompts)], sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class PartialOutputs:
    """The outputs generated so far, beside the output file, so that an interrupted run resumes.

    ``OUTPUT.partial.jsonl``: a first line ``{"settings": fingerprint, "n": number of prompts}``, then
    ``{"i": prompt index, "output": text}`` for each generated prompt, appended and flushed to disk
    after every batch. A re-run with the same fingerprint (:func:`settings_fingerprint`) takes them
    (a line cut by a crash is dropped); other settings start over. Removed once the output is written.
    """

    def __init__(self, output: str, fingerprint: str, n: int):
        self.path = Path(output + ".partial.jsonl")
        self.header = {"settings": fingerprint, "n": n}
        self.done: dict[int, str] = {}
        lines = self.path.read_text(encoding="utf-8").splitlines() if self.path.is_file() else []
        rows = []
        for line in lines:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # the line a crash cut short, and nothing after it
        if rows and rows[0] == self.header:
            self.done = {int(r["i"]): r["output"] for r in rows[1:]
                         if isinstance(r, dict) and isinstance(r.get("output"), str) and 0 <= int(r.get("i", -1)) < n}
        elif rows:
            logger.warning("%s holds outputs of other settings (model, prompts or sampling options): starting over",
                           self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", encoding="utf-8") as f:  # rewritten whole: the header and the usable rows
            for row in [self.header] + [{"i": i, "output": t} for i, t in sorted(self.done.items())]:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def add(self, indices: Sequence[int], texts: Sequence[str]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            for i, t in zip(indices, texts):
                f.write(json.dumps({"i": int(i), "output": t}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def generate(cfg: GenerateConfig) -> dict[str, Any]:
    """Generate one output per prompt and write them; returns a summary."""
    import torch

    from ..generation import generate_texts
    from ..models import load_model, load_tokenizer, resolve_dtype, torch_dtype

    items = read_prompts(cfg.prompts, cfg.limit)
    name = cfg.generator or default_generator(cfg.model)
    tok = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    dtype = resolve_dtype(cfg.dtype, cfg.model, cfg.trust_remote_code)
    model = load_model(cfg.model, "causal", tokenizer=tok, dtype=torch_dtype(dtype),
                       trust_remote_code=cfg.trust_remote_code).eval()
    model.to(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    prompts = [p for _, p in items]
    partial = PartialOutputs(cfg.output, settings_fingerprint(cfg, prompts), len(prompts))
    if partial.done:
        logger.info("resuming: %d of %d outputs from %s", len(partial.done), len(prompts), partial.path)
    t0 = time.time()
    texts = generate_texts(model, tok, prompts, template=cfg.template, batch_size=cfg.batch_size,
                           max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature or 1.0, top_p=cfg.top_p,
                           do_sample=cfg.temperature > 0, max_prompt_tokens=cfg.max_prompt_tokens,
                           progress_desc=f"generate ({name})", seed=cfg.seed, done=partial.done,
                           on_batch=partial.add)
    elapsed = time.time() - t0
    # AlpacaEval matches outputs to references by instruction: records given as `prompt` get one
    rows = [{**({} if "instruction" in rec else {"instruction": p}), **rec, "output": t, "generator": name}
            for (rec, p), t in zip(items, texts)]
    if cfg.output.endswith(".jsonl"):
        write_jsonl(cfg.output, rows)
    else:
        write_json(cfg.output, rows)
    partial.remove()
    return {"n": len(rows), "resumed": len(partial.done), "output": cfg.output, "generator": name, "model": cfg.model, "dtype": dtype,
            "avg_length": round(sum(len(t) for t in texts) / len(texts), 1), "elapsed_s": round(elapsed, 3),
            "n_empty": sum(1 for t in texts if not t.strip())}
