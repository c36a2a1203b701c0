"""The one reward-model forward: laid-out examples in, rewards out, in batches.

Every reader of a reward model goes through :func:`rm_forward`: `finegrain eval-rm` and
`finegrain show-rewards` (through :class:`finegrain.rm.model.RewardModel`) and PPO
(:class:`finegrain.ppo.rewards.RewardScorer`). The examples come laid out by
:mod:`finegrain.rm.inputs` (text through ``build_rm_example``, a policy's ids through
``rm_example_from_ids``; the ``echo`` view is in the layout), so the forward is the same for a
token or a sequence RM, a decoder or an encoder. Per example it returns a token RM's r_t over the
response positions (shape (T,), closing token included) or a sequence RM's score (shape ()).

The pad rule (one for every kind): examples are batched by length and right-padded, as in
training. An encoder is padded with its own pad token (its attention mask hides it; RoBERTa-like
position ids count the non-pad tokens). A decoder's sequence head takes its score at the last
position whose id is not ``config.pad_token_id``; a decoder is therefore padded with an id that
no row of the batch holds (its pad token when free) and told, for the forward, that this id is
the pad. The score then sits on each row's closing token even when the tokenizer's pad is its EOS
(GPT-2, SmolLM2), and nothing is added to the model. Padded positions come after every real token,
so under causal attention they change no reward.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from ..tokens import PromptResponse, is_encoder_style, right_pad


def length_batches(examples: Sequence[PromptResponse], batch_size: int):
    """Yield (indices, examples) in batches of similar length (less padding)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        yield idx, [examples[i] for i in idx]


def batch_pad_id(tokenizer, rows: Sequence[Sequence[int]]) -> int:
    """The id a batch is right-padded with (the module's pad rule).

    >>> class Tok:  # a decoder of 6 ids whose pad is its EOS (id 0), which closes every row
    ...     pad_token_id = eos_token_id = 0
    ...     def num_special_tokens_to_add(self, pair): return 0
    ...     def __len__(self): return 6
    >>> batch_pad_id(Tok(), [[3, 1, 0], [2, 0]])
    4
    """
    pad = tokenizer.pad_token_id
    if is_encoder_style(tokenizer):
        return pad if pad is not None else 0
    used = {t for row in rows for t in row}
    if pad is not None and pad not in used:
        return pad
    free = next((i for i in range(len(tokenizer)) if i not in used), None)
    if free is not None:
        return free
    # a batch holding every id (a toy vocabulary): any id but the closing EOS still leaves the score
    # on it for transformers' own "rightmost id that is not pad" rule
    return next(i for i in range(len(tokenizer)) if i != tokenizer.eos_token_id)


@contextlib.contextmanager
def padded_with(model, pad_id: int):
    """Tell ``model``'s head, for the duration of a forward, that ``pad_id`` is its pad token."""
    old = model.config.pad_token_id
    model.config.pad_token_id = pad_id
    try:
        yield
    finally:
        model.config.pad_token_id = old


@torch.inference_mode()
def rm_forward(model, tokenizer, examples: Sequence[PromptResponse], kind: str, batch_size: int, *,
               desc: str | None = None) -> list[torch.Tensor]:
    """Per example, in order: r_t over its response positions (token RM, (T,)) or its score (sequence RM, ()).

    ``desc`` shows a progress bar with that label.
    """
    from ..tracking import progress

    device = next(model.parameters()).device
    encoder = is_encoder_style(tokenizer)
    out: list[torch.Tensor] = [torch.empty(0)] * len(examples)
    bar = progress(total=len(examples), desc=desc) if desc else None
    for idx, chunk in length_batches(examples, batch_size):
        rows = [ex.input_ids for ex in chunk]
        pad = batch_pad_id(tokenizer, rows)
        ids, mask = right_pad(rows, pad)
        with contextlib.nullcontext() if encoder else padded_with(model, pad):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().cpu()
        for i, row, ex in zip(idx, logits, chunk):
            out[i] = row[0] if kind == "sequence" else row[ex.response_start:ex.response_end, 0]  # (1,) / (L, 1)
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    return out


def response_scores(raw: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B,) one number per response from :func:`rm_forward`'s output: Eq. 1 (the mean of r_t) for a
    token RM, the head's score for a sequence RM (a 0-d tensor is its own mean)."""
    return torch.stack([r.mean() for r in raw]) if len(raw) else torch.zeros(0)
