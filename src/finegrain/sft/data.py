"""SFT records on disk -> tokenised examples with a response-only loss mask -> padded batches.

A record has ``prompt`` and ``response`` (or ``chosen``, TRL's preference format: the preferred
response is the demonstration). The model input is the decoder layout reward models
read too (:func:`finegrain.tokens.decoder_example`): ``format_prompt(prompt)`` and the response are
tokenised separately, EOS is appended, and the prompt is cut from the left first when too long.
The loss covers the response tokens and that EOS, never the prompt.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch

from ..data.loaders import LoadReport, Rejects, check_id, check_text, content_id, located
from ..errors import ConfigError, InputError
from ..io import iter_records, write_jsonl
from ..tokens import decoder_example, is_encoder_style, right_pad

IGNORE_INDEX = -100  # label of positions without loss (transformers' convention)
RESPONSE_FIELDS = ("response", "chosen")


@dataclass(frozen=True)
class SFTRecord:
    id: str
    prompt: str
    response: str


def record_from_dict(rec: dict) -> SFTRecord:
    """Validate one record; raises :class:`InputError` naming the field."""
    prompt = check_text(rec.get("prompt"), "prompt")
    name = next((f for f in RESPONSE_FIELDS if f in rec), None)
    if name is None:
        raise InputError("missing: an SFT record needs `response` (or `chosen`)", field="response")
    response = check_text(rec.get(name), name)
    rid = check_id(rec["id"]) if rec.get("id") is not None else content_id(prompt, response)
    return SFTRecord(rid, prompt, response)


def load_sft_records(path: str, *, skip_invalid: bool = False,
                     rejects_path: str | os.PathLike | None = None) -> tuple[list[SFTRecord], int]:
    """Valid records of ``path`` and the number skipped (``skip_invalid``; else the first bad one raises).

    With ``skip_invalid`` a record that cannot be read (invalid JSON, not an object) is skipped
    too, and with ``rejects_path`` every skipped record is written there as a JSON line
    ``{path, location, field, error, record}`` (the rejects file of the pair loaders).
    """
    reject = Rejects(skip_invalid, LoadReport([], str(path), "sft"))
    out = []
    for location, rec in iter_records(path, on_error=reject if skip_invalid else None):
        try:
            out.append(record_from_dict(rec))
        except InputError as e:
            reject(located(e, str(path), location), rec, location)
    if reject.rows and rejects_path is not None:
        write_jsonl(rejects_path, reject.rows)
    if not out:
        raise InputError("no valid SFT records (need `prompt` and `response` or `chosen`)", path=path)
    return out, reject.report.n_rejected


@dataclass
class SFTExample:
    """One tokenised record: ``input_ids`` = prompt ids + response ids + EOS; ``labels`` = IGNORE on the prompt."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool


def build_sft_example(tokenizer, prompt: str, response: str, *, max_length: int,
                      template: str | None = None) -> SFTExample:
    if is_encoder_style(tokenizer):
        raise ConfigError("this tokenizer adds encoder-style special tokens ([CLS]/[SEP]); SFT needs a causal "
                          "(decoder) language model's tokenizer")
    ex = decoder_example(tokenizer, prompt, response, max_length=max_length, template=template)
    labels = [IGNORE_INDEX] * ex.response_start + ex.input_ids[ex.response_start:ex.response_end]
    return SFTExample(ex.input_ids, labels, ex.truncated)


@dataclass
class SFTBatch:
    """Right-padded batch.

    input_ids:       (B, L) ids, pad after each sequence
    attention_mask:  (B, L) 1 on real tokens
    labels:          (B, L) target ids on response positions (incl. EOS), IGNORE_INDEX elsewhere
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def to(self, device) -> "SFTBatch":
        return SFTBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))

    @property
    def n_target_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


def collate_sft(examples: Sequence[SFTExample], pad_id: int) -> SFTBatch:
    ids, mask = right_pad([e.input_ids for e in examples], pad_id)
    labels, _ = right_pad([e.labels for e in examples], IGNORE_INDEX)
    return SFTBatch(ids, mask, labels)
