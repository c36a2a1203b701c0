"""Text to token ids: the prompt rule, padding, and the prompt + response layout sft and rm share.

One rule for turning a user prompt into model input everywhere (SFT, reward models, PPO
rollouts, `finegrain generate`): the tokenizer's chat template when it has one (a single user
turn, generation prompt added), else ``template`` with ``{prompt}`` replaced.

Prompt and response are tokenised separately and concatenated, so the prompt/response boundary
is identical in training, rollouts and scoring, and for both sides of a pair (DESIGN.md
decision 1). The decoder layout (:func:`decoder_example`) is
``prompt ids + response ids + [EOS]`` (:func:`encode_prompts`: the formatted prompt, after the
BOS a tokenizer such as Llama's puts first); its positions ``response_start`` to
``response_end`` are the response's tokens and that closing EOS (SFT's loss, a reward model's
rewards). Truncation keeps the response first: the prompt is cut from the left (its end,
closest to the response, stays) until everything fits; if the response alone is still too
long, it is cut on the right, keeping its closing token. The reward model's own layouts (the
encoder pair layout, the echo view) build on this in :mod:`finegrain.rm.inputs`.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import ConfigError

DEFAULT_TEMPLATE = "{prompt}\n"


def format_prompt(tokenizer, prompt: str, template: str | None = None, *, use_chat_template: bool = True) -> str:
    if use_chat_template and template is None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return (template or DEFAULT_TEMPLATE).replace("{prompt}", prompt)


def encode_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text with no special tokens added (templates carry their own)."""
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def _pad(seqs: Sequence[Sequence[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            cols = slice(width - len(s), width) if left else slice(0, len(s))
            ids[i, cols] = torch.as_tensor(s, dtype=torch.long)
            mask[i, cols] = 1
    return ids, mask


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids and attention mask, padded on the left (what decoder generation needs)."""
    return _pad(seqs, pad_id, left=True)


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids and mask padded on the right.

    >>> right_pad([[5, 6], [7]], 0)[0].tolist(), left_pad([[5, 6], [7]], 0)[1].tolist()
    ([[5, 6], [7, 0]], [[1, 1], [0, 1]])
    """
    return _pad(seqs, pad_id, left=False)


@dataclass
class PromptResponse:
    """One tokenised (prompt, response).

    input_ids:         full model input
    response_start:    index in input_ids of the first response token
    response_end:      exclusive end of the response positions (includes the closing EOS/SEP)
    response_offsets:  (start, end) character offsets of each response position in the response
                       text; the closing token gets (len(response), len(response)); empty when
                       offsets were not asked for
    truncated:         True when anything was cut
    """

    input_ids: list[int]
    response_start: int
    response_end: int
    response_offsets: list[tuple[int, int]]
    truncated: bool

    @property
    def response_ids(self) -> list[int]:
        return self.input_ids[self.response_start:self.response_end]


def is_encoder_style(tokenizer) -> bool:
    """True for tokenizers whose pair template closes the second text with a special token (BERT-like
    ``[CLS] a [SEP] b [SEP]``, RoBERTa's ``<s> a </s></s> b </s>``).

    A decoder tokenizer that only puts BOS before each text (Llama 2 and 3, Mistral, Gemma: ``<s> a <s> b``)
    adds special tokens to a pair too, but is not one: its responses take the decoder layout, closed by EOS.
    """
    if tokenizer.num_special_tokens_to_add(pair=True) == 0:
        return False
    try:
        seq = tokenizer("a", "b", add_special_tokens=True).sequence_ids()
    except (ValueError, AttributeError, NotImplementedError):  # a slow tokenizer has no sequence ids
        return True
    return seq[-1] is None


def encode_text(tokenizer, text: str, with_offsets: bool = False) -> tuple[list[int], list[tuple[int, int]] | None]:
    """Ids of ``text`` without special tokens, and its character offsets when asked (fast tokenizers only)."""
    if with_offsets:
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError("character offsets need a fast (Rust) tokenizer; this one is a slow Python tokenizer")
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]
    return tokenizer(text, add_special_tokens=False)["input_ids"], None


def leading_bos(tokenizer) -> int | None:
    """The BOS id a decoder tokenizer puts before every text (Llama, Mistral, Gemma), else None (GPT-2,
    Qwen2, SmolLM2: no BOS; encoder tokenizers lay out their own special tokens). Worked out once per
    tokenizer (and BOS id): every example's prompt asks."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    known = _LEADING_BOS.get(tokenizer)
    if known is not None and known[0] == bos:
        return known[1]
    first = tokenizer("a", add_special_tokens=True)["input_ids"][:1]
    out = bos if first == [bos] and not is_encoder_style(tokenizer) else None
    _LEADING_BOS[tokenizer] = (bos, out)
    return out


_LEADING_BOS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (its BOS id, leading_bos)


def encode_prompts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of formatted prompts, the start of every model input: each text's ids, after the
    tokenizer's BOS (:func:`leading_bos`) unless the text already begins with it (a chat template
    that writes it). Models such as Llama and Gemma are trained with it and degrade without it."""
    bos = leading_bos(tokenizer)
    ids = encode_texts(tokenizer, texts)
    return ids if bos is None else [s if s[:1] == [bos] else [bos] + s for s in ids]


def encode_response(tokenizer, response: str) -> list[int]:
    """The response's token ids as every layout tokenises it (no special tokens, nothing cut)."""
    return encode_text(tokenizer, response)[0]


def decoder_layout(prompt_ids: Sequence[int], response_ids: Sequence[int], eos_id: int, *, max_length: int,
                   copies: int = 1) -> tuple[list[int], int, int, int, bool]:
    """(ids, response_start, response_end, kept response tokens, truncated) of the decoder layout.

    ``prompt + (response + [EOS]) * copies``, the positions of the last copy being the response's;
    the truncation policy of the module docstring, every copy cut alike.

    >>> decoder_layout([1, 2], [5, 6], 0, max_length=10, copies=2)
    ([1, 2, 5, 6, 0, 5, 6, 0], 5, 8, 2, False)
    >>> decoder_layout([1, 2, 3], [5, 6, 7], 0, max_length=5)   # the prompt is cut from its left
    ([3, 5, 6, 7, 0], 1, 5, 3, True)
    """
    budget = max_length - copies                      # room for tokens besides the closing EOS(es)
    if budget < copies:
        raise ConfigError(f"--max-length {max_length} leaves no room for a response: the input adds {copies} "
                          f"special token(s) and needs {copies} response token(s); use at least {2 * copies}")
    r_ids = list(response_ids)[: budget // copies]
    keep_prompt = budget - copies * len(r_ids)
    p_ids = list(prompt_ids)[max(0, len(prompt_ids) - keep_prompt):] if keep_prompt > 0 else []
    truncated = len(r_ids) < len(response_ids) or len(p_ids) < len(prompt_ids)
    ids = p_ids + (r_ids + [eos_id]) * copies
    return ids, len(ids) - len(r_ids) - 1, len(ids), len(r_ids), truncated


def decoder_example(tokenizer, prompt: str, response: str, *, max_length: int, template: str | None = None,
                    with_offsets: bool = False, copies: int = 1) -> PromptResponse:
    """The decoder layout of one (prompt, response) as text (see the module docstring)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no EOS token to close responses with")
    p_ids = encode_prompts(tokenizer, [format_prompt(tokenizer, prompt, template)])[0]
    r_ids, r_off = encode_text(tokenizer, response, with_offsets)
    ids, start, end, kept, truncated = decoder_layout(p_ids, r_ids, eos, max_length=max_length, copies=copies)
    offsets = (list(r_off[:kept]) + [(len(response), len(response))]) if r_off is not None else []
    return PromptResponse(ids, start, end, offsets, truncated)
