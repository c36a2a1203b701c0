"""Reward models: a token RM (one reward per position) or a sequence RM (one score per sequence).

- token RM:    ``AutoModelForTokenClassification(num_labels=1)``; r_t = logits[:, t, 0]; a whole
               response scores R = mean of r_t over its positions (Eq. 1).
- sequence RM: ``AutoModelForSequenceClassification(num_labels=1)``; the score is the model's
               own pooled logit (last non-pad token for decoders, [CLS] for BERT-like encoders),
               so plain ``transformers`` scoring of a saved checkpoint equals ours.

The pad pitfall: decoder heads find "the last token" as the last one that is not pad. When pad
== EOS (GPT-2, SmolLM2 without a pad token), the closing EOS would be skipped. A sequence RM
therefore gets a distinct pad token (``ensure_distinct_pad``): one new embedding row, only ever
seen at right-padded positions that causal attention keeps away from real tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch

from ..errors import ConfigError
from ..models import clamp_max_length, load_model, load_tokenizer, read_meta
from ..tokens import is_encoder_style, right_pad
from .inputs import RMExample, build_rm_example, check_view

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
        import json

        archs = json.loads(cfg.read_text()).get("architectures") or []
        if any(a.endswith("ForTokenClassification") for a in archs):
            return "token"
        if any(a.endswith("ForSequenceClassification") for a in archs):
            return "sequence"
    return None


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
    """A trained reward model with the one input rule of ``rm/inputs.py``."""

    def __init__(self, model, tokenizer, kind: Kind, *, max_length: int = 1024, template: str | None = None,
                 meta: dict | None = None, view: str = "causal"):
        if kind not in ("token", "sequence"):
            raise ConfigError(f"reward model kind must be 'token' or 'sequence', got {kind!r}")
        check_view(tokenizer, view)
        self.model, self.tokenizer, self.kind, self.view = model, tokenizer, kind, view
        self.max_length, self.template, self.meta = max_length, template, dict(meta or {})
        if kind == "sequence":
            ensure_distinct_pad(tokenizer, model)

    @classmethod
    def load(cls, path: str, *, dtype=None, device: str | None = None, trust_remote_code: bool = False,
             max_length: int | None = None) -> "RewardModel":
        """Load a reward-model directory (kind from finegrain.json, else from its architecture)."""
        if not Path(path).is_dir():
            raise ConfigError(f"reward model directory not found: {path}")
        kind = kind_of_checkpoint(path)
        if kind is None:
            raise ConfigError(f"{path} is not a reward model: finegrain.json has no 'kind' and config.json "
                              "names no *ForTokenClassification / *ForSequenceClassification architecture")
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

    @torch.no_grad()
    def forward_batch(self, examples: Sequence[RMExample]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) rewards and (B, L) response mask for a batch of examples (for PPO).

        A token RM gives a reward at every response position; a sequence RM puts its score on the
        closing token and 0 elsewhere (the standard RLHF placement).
        """
        batch = collate(examples, self.tokenizer.pad_token_id).to(self.device)
        out = model_outputs(self.model, self.kind, batch.input_ids, batch.attention_mask).float()
        if self.kind == "token":
            return out * batch.response_mask, batch.response_mask
        rewards = torch.zeros(batch.input_ids.shape, dtype=out.dtype, device=out.device)
        rewards[torch.arange(len(examples), device=out.device), batch.last_index] = out
        return rewards, batch.response_mask

    @torch.no_grad()
    def score_batch(self, examples: Sequence[RMExample]) -> torch.Tensor:
        """(B,) one score per example: Eq. 1 (mean reward) for a token RM, the head's score for a sequence RM."""
        rewards, mask = self.forward_batch(examples)
        if self.kind == "token":
            from .losses import mean_reward

            return mean_reward(rewards, mask)
        return rewards.sum(-1)

    def iter_batches(self, examples: Sequence[RMExample], batch_size: int):
        """Yield (indices, examples) in batches of similar length (less padding)."""
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            yield idx, [examples[i] for i in idx]

    def score(self, prompts: Sequence[str], responses: Sequence[str], *, batch_size: int = 8) -> list[float]:
        """One score per (prompt, response)."""
        examples = [self.encode(p, r) for p, r in zip(prompts, responses, strict=True)]
        out = [0.0] * len(examples)
        for idx, chunk in self.iter_batches(examples, batch_size):
            for i, s in zip(idx, self.score_batch(chunk).tolist()):
                out[i] = s
        return out

    def token_rewards(self, prompts: Sequence[str], responses: Sequence[str], *,
                      batch_size: int = 8) -> list[TokenRewards]:
        """Per-position rewards of each response (token RMs only)."""
        if self.kind != "token":
            raise ConfigError("per-token rewards need a token reward model; this one is a sequence RM")
        examples = [self.encode(p, r, with_offsets=True) for p, r in zip(prompts, responses, strict=True)]
        out: list[TokenRewards | None] = [None] * len(examples)
        for idx, chunk in self.iter_batches(examples, batch_size):
            rewards, _ = self.forward_batch(chunk)
            for row, i in enumerate(idx):
                ex = chunk[row]
                r = rewards[row, ex.response_start:ex.response_end].tolist()
                out[i] = TokenRewards(self._token_texts(ex, responses[i]), list(ex.response_offsets), r)
        return out  # type: ignore[return-value]

    def _token_texts(self, ex: RMExample, response: str) -> list[str]:
        ids = ex.response_ids
        return [response[s:e] if e > s else self.tokenizer.convert_ids_to_tokens(ids[k])
                for k, (s, e) in enumerate(ex.response_offsets)]
