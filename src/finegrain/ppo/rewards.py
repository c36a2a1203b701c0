"""Reward-model scoring of rollouts, with the same input rule as RM training (rm/inputs.py).

Two cases:

- same tokenizer (identical vocabulary and EOS): the RM reads the policy's own ids,
  ``prompt ids + response ids (without EOS) + [EOS]`` (the decoder layout of
  :func:`finegrain.rm.inputs.build_rm_example`; with the RM's ``echo`` view the response twice),
  so RM response position i is policy token i and the RM's closing EOS is the policy's EOS; no
  mapping. A sequence RM trained from a policy whose pad is its EOS (GPT-2, SmolLM2) has one
  token more, its own pad: it only fills padded positions, so the RM still reads the policy's
  ids (:func:`tokenizers_match`).
- different tokenizers (``--cross-tokenizer``): the decoded response is re-tokenised with
  :func:`finegrain.rm.inputs.build_rm_example` and each RM token's reward is split over the
  policy tokens its characters overlap, in proportion to the overlap (:func:`map_rewards_by_offsets`), so the
  sum of a response's rewards is preserved. An RM tokenizer that trims offsets (RoBERTa-style)
  gives tokens of whitespace alone zero-width spans; they are first widened to the whitespace
  they stand for (:func:`spread_trimmed_offsets`).

In both cases the RM's closing token (zero-width, at the end of the text) lands on the
policy's last token: its EOS when the response ended, else its last sampled token.

The RM forward is the one of eval-rm and show-rewards (:mod:`finegrain.rm.scorer`, through
:class:`finegrain.rm.model.RewardModel`): a sequence RM's score is its output at the closing
token, whatever its pad token; a token RM's score is Eq. 1, the mean of its r_t over the
response positions including the closing token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..rm.inputs import RMExample, rm_example_from_ids
from ..rm.model import PAD_TOKEN, RewardModel
from ..rm.scorer import response_scores
from ..tokens import is_encoder_style

Offsets = Sequence[tuple[int, int]]


@dataclass
class RewardOutput:
    """RM view of a batch of rollouts.

    scores:         (B,) one number per response: a sequence RM's score, or a token RM's Eq. 1 mean
    token_rewards:  (B, T) r_t mapped onto the policy's response tokens (raw, unscaled; token RM
                    only, else None); each row sums to the RM's sum of r_t
    n_scored:       (B,) number of RM response positions (T of Eq. 1, closing token included)
    """

    scores: torch.Tensor
    token_rewards: torch.Tensor | None
    n_scored: torch.Tensor


# ----------------------------------------------------------------------------- tokenizers
def tokenizers_match(a, b) -> bool:
    """True when two tokenizers map text to the same ids (same vocabulary, EOS and pair layout).

    finegrain's own pad token (``ensure_distinct_pad`` gives it to a sequence RM whose base had
    pad == EOS) does not count: appended after the vocabulary and only ever put at padded
    positions, it changes no id that text maps to.
    """
    if a is b:
        return True
    return (text_vocab(a) == text_vocab(b) and a.eos_token_id == b.eos_token_id
            and is_encoder_style(a) == is_encoder_style(b))


def text_vocab(tok) -> dict[str, int]:
    """The tokenizer's vocabulary without finegrain's pad token when that is its pad and its last id."""
    vocab = tok.get_vocab()
    if tok.pad_token == PAD_TOKEN and vocab.get(PAD_TOKEN) == max(vocab.values()):
        del vocab[PAD_TOKEN]
    return vocab


def policy_token_offsets(tokenizer, ids: Sequence[int], text: str) -> list[tuple[int, int]]:
    """Character span in ``text`` (the decoded response) of each policy token, by incremental decoding.

    Token i covers ``[end_{i-1}, end_i)`` with ``end_i`` = length of the longest common prefix of
    ``text`` and the decoding of ``ids[:i+1]``: a token that completes no character yet (part
    of a multi-byte character) or a special token (EOS) gets a zero-width span.
    """
    offsets: list[tuple[int, int]] = []
    end = 0
    for i in range(len(ids)):
        prefix = tokenizer.decode(list(ids[: i + 1]), skip_special_tokens=True)
        common = 0
        limit = min(len(prefix), len(text))
        while common < limit and prefix[common] == text[common]:
            common += 1
        new_end = max(end, common)
        offsets.append((end, new_end))
        end = new_end
    return offsets


def map_rewards_by_offsets(src_offsets: Offsets, src_rewards: Sequence[float], dst_offsets: Offsets) -> list[float]:
    """Move per-token rewards from one tokenisation of a text to another, preserving their sum.

    Each source token's reward is split over the destination tokens whose character spans
    overlap its span, in proportion to the overlap; the last overlapping token gets the
    remainder (so rounding never changes the sum). A source token that overlaps nothing
    (zero width, such as the closing EOS, or beyond the text) goes to the last destination token.
    """
    if not dst_offsets:
        raise ValueError("no destination tokens to put rewards on")
    out = [0.0] * len(dst_offsets)
    for (s, e), r in zip(src_offsets, src_rewards):
        r = float(r)
        overlaps = [(j, min(e, de) - max(s, ds)) for j, (ds, de) in enumerate(dst_offsets)]
        overlaps = [(j, w) for j, w in overlaps if w > 0]
        if not overlaps:
            out[-1] += r
            continue
        total = sum(w for _, w in overlaps)
        given = 0.0
        for j, w in overlaps[:-1]:
            share = r * w / total
            out[j] += share
            given += share
        out[overlaps[-1][0]] += r - given
    return out


def spread_trimmed_offsets(offsets: Offsets, text_len: int) -> list[tuple[int, int]]:
    """``offsets`` with each zero-width span widened to the uncovered characters around it.

    A tokenizer that trims offsets (RoBERTa's byte-level BPE, ``trim_offsets=True``) gives a token
    of whitespace alone a zero-width span and leaves its characters, and the leading space of the
    next word, covered by no token. Mapped as it is, such a token's reward would land on the last
    policy token (see :func:`map_rewards_by_offsets`); widened to the gap between the previous and
    the next token that cover characters, it lands on the policy tokens holding that whitespace.
    A zero-width span with no uncovered character around it is kept.

    >>> spread_trimmed_offsets([(0, 5), (6, 6), (7, 12)], 12)  # "Hello  world": "Ġ" and "Ġworld" trimmed
    [(0, 5), (5, 7), (7, 12)]
    """
    n = len(offsets)
    prev_end, next_start = [0] * n, [text_len] * n
    end = 0
    for k, (s, e) in enumerate(offsets):
        prev_end[k] = end
        if e > s:
            end = max(end, e)
    start = text_len
    for k in range(n - 1, -1, -1):
        next_start[k] = start
        s, e = offsets[k]
        if e > s:
            start = min(start, s)
    return [(s, e) if e > s or next_start[k] <= prev_end[k] else (prev_end[k], next_start[k])
            for k, (s, e) in enumerate(offsets)]


# ----------------------------------------------------------------------------- the scorer
class RewardScorer:
    """Scores rollouts with a reward model; see the module docstring for the two tokenizer cases.

    The RM's input layout and forward are those of eval-rm and show-rewards (:class:`RewardModel`).
    """

    def __init__(self, model, tokenizer, kind: str, policy_tokenizer, *, max_length: int,
                 template: str | None = None, batch_size: int = 16, view: str = "causal",
                 stop_ids: Sequence[int] = ()):
        self.rm = RewardModel(model, tokenizer, kind, max_length=max_length, template=template, view=view)
        self.kind, self.policy_tokenizer, self.batch_size = kind, policy_tokenizer, batch_size
        # what ends a policy response (generation.stop_token_ids): the RM sees its own EOS in that token's place,
        # as in the pairs it learnt from (a chat model's end-of-turn token is no part of a response's text)
        self.stop_ids = {policy_tokenizer.eos_token_id, *stop_ids}
        # the ids layout is the decoder one; an (unusual) encoder-style policy tokenizer takes the text path
        self.same_tokenizer = tokenizers_match(tokenizer, policy_tokenizer) and not is_encoder_style(tokenizer)

    def examples(self, prompts: Sequence[str], query_ids: Sequence[Sequence[int]], response_ids: torch.Tensor,
                 response_mask: torch.Tensor, texts: Sequence[str]) -> list[RMExample]:
        """RM inputs of a batch: policy ids (same tokenizer) or re-tokenised text (cross-tokenizer)."""
        if not self.same_tokenizer:
            return [self.rm.encode(p, t, with_offsets=self.kind == "token") for p, t in zip(prompts, texts)]
        eos = self.rm.tokenizer.eos_token_id
        out = []
        for q, r, m in zip(query_ids, response_ids, response_mask):
            body = [t for t in r[m.bool()].tolist()]
            if body and body[-1] in self.stop_ids:
                body = body[:-1]
            out.append(rm_example_from_ids(list(q), body, eos, self.rm.max_length, self.rm.view))
        return out

    def response_scores(self, prompts: Sequence[str], query_ids: Sequence[Sequence[int]], response_ids: torch.Tensor,
                        response_mask: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """Scores (B,) alone (--sequence-reward-model): a token RM's r_t are not mapped onto policy tokens."""
        exs = self.examples(prompts, query_ids, response_ids, response_mask, texts)
        return response_scores(self.rm.rewards(exs, self.batch_size))

    def score(self, prompts: Sequence[str], query_ids: Sequence[Sequence[int]], response_ids: torch.Tensor,
              response_mask: torch.Tensor, texts: Sequence[str]) -> RewardOutput:
        """Scores (B,) and, for a token RM, r_t mapped onto the policy tokens (B, T)."""
        exs = self.examples(prompts, query_ids, response_ids, response_mask, texts)
        raw = self.rm.rewards(exs, self.batch_size)
        n_scored = torch.tensor([ex.response_end - ex.response_start for ex in exs], dtype=torch.long)
        scores = response_scores(raw)
        if self.kind == "sequence":
            return RewardOutput(scores, None, n_scored)
        token_rewards = torch.zeros(response_ids.shape, dtype=torch.float32)
        for b, (r, ex) in enumerate(zip(raw, exs)):
            n_pol = int(response_mask[b].sum())
            if n_pol == 0:
                continue
            if self.same_tokenizer:
                token_rewards[b, :n_pol] = torch.tensor(map_same_tokenizer(r.tolist(), n_pol))
            else:
                ids = response_ids[b, :n_pol].tolist()
                dst = policy_token_offsets(self.policy_tokenizer, ids, texts[b])
                *body, closing = ex.response_offsets  # the closing token keeps its place: the last policy token
                src = spread_trimmed_offsets(body, len(texts[b])) + [closing]
                token_rewards[b, :n_pol] = torch.tensor(map_rewards_by_offsets(src, r.tolist(), dst))
        return RewardOutput(scores, token_rewards, n_scored)


def map_same_tokenizer(rm_rewards: Sequence[float], n_policy: int) -> list[float]:
    """RM response position i -> policy token i; the closing token (last) -> the last policy token.

    With an ended response the closing token IS the policy's EOS; otherwise (no EOS sampled,
    or a response truncated for the RM) its reward joins the last policy token, so sums are kept.
    """
    out = [0.0] * n_policy
    body = list(rm_rewards[:-1])
    for i, r in enumerate(body[:n_policy]):
        out[i] += float(r)
    for r in body[n_policy:]:
        out[-1] += float(r)
    out[-1] += float(rm_rewards[-1])
    return out
