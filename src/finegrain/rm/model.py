"""Reward models: a token RM (one reward per position) or a sequence RM (one score per sequence).

- token RM:    ``AutoModelForTokenClassification(num_labels=1)``; r_t = logits[:, t, 0]; a whole
               response scores R = mean of r_t over its positions (Eq. 1).
- sequence RM: ``AutoModelForSequenceClassification(num_labels=1)``; the score is the model's
               own pooled logit (last non-pad token for decoders, [CLS] for BERT-like encoders),
               so plain ``transformers`` scoring of a saved checkpoint equals ours.

The pad pitfall: decoder heads find "the last token" as the last one that is not pad. When pad
== EOS (GPT-2, SmolLM2 without a pad token), the closing EOS would be skipped. train-rm therefore
gives a sequence RM a distinct pad token (``ensure_distinct_pad``): one new embedding row, only
ever seen at right-padded positions that causal attention keeps away from real tokens, so the
saved checkpoint scores right with plain transformers too. Scoring a loaded RM needs no such
token: :mod:`finegrain.rm.scorer` pads each batch with an id its rows do not hold.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch

from ..errors import ConfigError, InputError
from ..models import clamp_max_length, interrupted_save, load_model, load_tokenizer, read_meta
from ..tokens import is_encoder_style, right_pad
from .inputs import RMExample, build_rm_example, check_view
from .scorer import response_scores, rm_forward

Kind = Literal["token", "sequence"]
PAD_TOKEN = "<|finegrain_pad|>"


@dataclass
class RMBatch:
    """A right-padded batch of RM inputs.

    input_ids:       (B, L) ids, pad after each sequence
    attention_mask:  (B, L) 1 on real tokens
    response_mask:   (B, L) 1 on response positions (tokens + closing token) = the T of Eq. 1
    last_index:      (B,) index of each row's closing token (where a sequence RM's score sits)
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    last_index: torch.Tensor

    def to(self, device) -> "RMBatch":
        return RMBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.response_mask,
                                               self.last_index)))


def position_mask(examples: Sequence[RMExample], width: int,
                  marks: Sequence[Sequence[bool]] | None = None) -> torch.Tensor:
    """(B, width) mask of response positions, or of the marked response positions when ``marks`` is given."""
    out = torch.zeros((len(examples), width), dtype=torch.long)
    for i, ex in enumerate(examples):
        if marks is None:
            out[i, ex.response_start:ex.response_end] = 1
        else:
            m = torch.as_tensor(list(marks[i]), dtype=torch.long)
            out[i, ex.response_start:ex.response_start + len(m)] = m
    return out


def collate(examples: Sequence[RMExample], pad_id: int) -> RMBatch:
    """Right-pad examples into an :class:`RMBatch`."""
    ids, attn = right_pad([ex.input_ids for ex in examples], pad_id)
    resp = position_mask(examples, ids.shape[1])
    last = torch.as_tensor([ex.response_end - 1 for ex in examples], dtype=torch.long)
    return RMBatch(ids, attn, resp, last)


def model_outputs(model, kind: Kind, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Token RM: (B, L) per-position rewards. Sequence RM: (B,) scores."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    if kind == "token":
        return logits[..., 0]   # (B, L, 1) -> (B, L)
    return logits[:, 0]          # (B, 1) -> (B,)


def ensure_distinct_pad(tokenizer, model) -> bool:
    """Give a decoder sequence RM a pad token different from EOS (see module doc). True if one was added."""
    model.config.pad_token_id = tokenizer.pad_token_id
    if is_encoder_style(tokenizer) or tokenizer.pad_token_id not in (None, tokenizer.eos_token_id):
        return False
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.config.pad_token_id = tokenizer.pad_token_id
    return True


def kind_of_checkpoint(path: str) -> Kind | None:
    """``token``/``sequence`` from finegrain.json, else from the saved architecture, else None."""
    kind = read_meta(path).get("kind")
    if kind in ("token", "sequence"):
        return kind
    cfg = Path(path) / "config.json"
    if cfg.exists():
        from ..io import read_json

        saved = read_json(cfg)  # a damaged file: one InputError line naming it
        archs = (saved.get("architectures") if isinstance(saved, dict) else None) or []
        if any(a.endswith("ForTokenClassification") for a in archs):
            return "token"
        if any(a.endswith("ForSequenceClassification") for a in archs):
            return "sequence"
    return None


def reward_model_kind(path: str) -> Kind:
    """The kind of the reward model saved in directory ``path``; a :class:`ConfigError` when it is none (an
    :class:`InputError` saying where it is when an interrupted save left it beside ``path``)."""
    if not Path(path).is_dir():
        if why := interrupted_save(path):
            raise InputError(why, path=path)
        raise ConfigError(f"reward model directory not found: {path}")
    kind = kind_of_checkpoint(path)
    if kind is None:
        raise ConfigError(f"{path} is not a reward model: finegrain.json has no 'kind' and config.json "
                          "names no *ForTokenClassification / *ForSequenceClassification architecture")
    return kind


@dataclass
class TokenRewards:
    """Per-position rewards of one response (its tokens and closing token).

    tokens:   the text of each position (the response slice; the special token for the closing one)
    offsets:  (start, end) character offsets in the response; the closing token is (len, len)
    rewards:  one float per position
    """

    tokens: list[str]
    offsets: list[tuple[int, int]]
    rewards: list[float]


class RewardModel:
    """A trained reward model with the one input rule of ``rm/inputs.py`` and the one forward of ``rm/scorer.py``."""

    def __init__(self, model, tokenizer, kind: Kind, *, max_length: int = 1024, template: str | None = None,
                 meta: dict | None = None, view: str = "causal"):
        if kind not in ("token", "sequence"):
            raise ConfigError(f"reward model kind must be 'token' or 'sequence', got {kind!r}")
        check_view(tokenizer, view)
        self.model, self.tokenizer, self.kind, self.view = model, tokenizer, kind, view
        self.max_length, self.template, self.meta = max_length, template, dict(meta or {})

    @classmethod
    def load(cls, path: str, *, dtype=None, device: str | None = None, trust_remote_code: bool = False,
             max_length: int | None = None) -> "RewardModel":
        """Load a reward-model directory (kind from finegrain.json, else from its architecture)."""
        kind = reward_model_kind(path)
        meta = read_meta(path)
        tok = load_tokenizer(path, trust_remote_code=trust_remote_code)
        model = load_model(path, kind, tokenizer=tok, trust_remote_code=trust_remote_code, dtype=dtype)
        model.eval()
        if device:
            model.to(device)
        limit = int(meta.get("max_length", 1024))
        if max_length is not None:
            limit = clamp_max_length(max_length, path, trust_remote_code, config=model.config)
        return cls(model, tok, kind, max_length=limit, template=meta.get("template"), meta=meta,
                   view=meta.get("token_view") or "causal")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, prompt: str, response: str, *, with_offsets: bool = False) -> RMExample:
        return build_rm_example(self.tokenizer, prompt, response, max_length=self.max_length,
                                template=self.template, with_offsets=with_offsets, view=self.view)

    def rewards(self, examples: Sequence[RMExample], batch_size: int = 8, *,
                desc: str | None = None) -> list[torch.Tensor]:
        """Per example: r_t over its response positions (token RM, (T,)) or its score (sequence RM, ())."""
        return rm_forward(self.model, self.tokenizer, examples, self.kind, batch_size, desc=desc)

    def forward_batch(self, examples: Sequence[RMExample]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) rewards and (B, L) response mask of one batch, L its longest example.

        A token RM gives a reward at every response position; a sequence RM puts its score on the
        closing token and 0 elsewhere (the standard RLHF placement).
        """
        mask = position_mask(examples, max((len(ex.input_ids) for ex in examples), default=0))
        out = torch.zeros(mask.shape)
        for i, (ex, r) in enumerate(zip(examples, self.rewards(examples, len(examples) or 1))):
            if self.kind == "token":
                out[i, ex.response_start:ex.response_end] = r
            else:
                out[i, ex.response_end - 1] = r
        return out, mask

    def score_batch(self, examples: Sequence[RMExample]) -> torch.Tensor:
        """(B,) one score per example: Eq. 1 (mean reward) for a token RM, the head's score for a sequence RM."""
        return response_scores(self.rewards(examples, len(examples) or 1))

    def score(self, prompts: Sequence[str], responses: Sequence[str], *, batch_size: int = 8) -> list[float]:
        """One score per (prompt, response)."""
        examples = [self.encode(p, r) for p, r in zip(prompts, responses, strict=True)]
        return response_scores(self.rewards(examples, batch_size)).tolist()

    def token_rewards(self, prompts: Sequence[str], responses: Sequence[str], *,
                      batch_size: int = 8) -> list[TokenRewards]:
        """Per-position rewards of each response (token RMs only)."""
        if self.kind != "token":
            raise ConfigError("per-token rewards need a token reward model; this one is a sequence RM")
        examples = [self.encode(p, r, with_offsets=True) for p, r in zip(prompts, responses, strict=True)]
        return [TokenRewards(self._token_texts(ex, resp), list(ex.response_offsets), r.tolist())
                for ex, resp, r in zip(examples, responses, self.rewards(examples, batch_size))]

    def _token_texts(self, ex: RMExample, response: str) -> list[str]:
        ids = ex.response_ids
        return [response[s:e] if e > s else self.tokenizer.convert_ids_to_tokens(ids[k])
                for k, (s, e) in enumerate(ex.response_offsets)]
