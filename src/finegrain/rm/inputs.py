"""How a (prompt, response) becomes reward-model input: one rule for training, evaluation and PPO.

Prompt and response are tokenised separately and concatenated, so the prompt/response boundary
is identical for both sides of a pair (DESIGN.md decision 1):

- decoder tokenizers (no special tokens added for pairs; GPT-2, Llama, Qwen2, SmolLM2):
  ``format_prompt(prompt) ids + response ids + [EOS]``
- encoder tokenizers (BERT-like, add special tokens for pairs):
  ``[CLS] prompt [SEP] response [SEP]``; the closing special token plays the role of EOS.

The response's scored positions are its tokens plus that closing token, so "the token after an
edit" always exists (the divergence-point rule of the alignment can land on it).

Views (how much of the response a token's reward sees; token RMs, DESIGN.md decision 5):

- ``causal``: the layout above. A decoder scores token t having read tokens up to t only.
- ``echo``: decoders only. The response is given twice, ``prompt + response + [EOS] + response + [EOS]``,
  and the scored positions are the second copy: each of them has read the whole response once
  (the "echo" trick of Springer et al. 2024 for decoder embeddings). The cost is the response's
  length again; the checkpoint stays a plain ``*ForTokenClassification`` model, and
  ``finegrain.json`` records ``token_view`` so every reader builds the same input.

An encoder (BERT-like) sees the whole input whatever the view; ``echo`` is refused for it.

Truncation (one policy, applied to both sides of a pair alike): the response keeps priority.
The prompt is cut from the left (its end, closest to the response, stays) until everything fits;
if the response alone is still too long, it is cut on the right, keeping its closing token
(with ``echo``, both copies are cut alike).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..errors import ConfigError
from ..generation import format_prompt

VIEWS = ("causal", "echo")


@dataclass
class RMExample:
    """One tokenised (prompt, response).

    input_ids:         full model input
    response_start:    index in input_ids of the first response token
    response_end:      exclusive end of the response positions (includes the closing EOS/SEP)
    response_offsets:  (start, end) character offsets of each response position in the response
                       text; the closing token gets (len(response), len(response))
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
    return tokenizer.num_special_tokens_to_add(pair=True) > 0


def pair_special_layout(tokenizer) -> tuple[list[int], list[int], list[int]]:
    """Special ids a pair template puts before the first text, between the texts, and after the second.

    Read off the tokenizer by encoding a probe pair (``[CLS] a [SEP] b [SEP]`` gives
    ``[CLS]``, ``[SEP]``, ``[SEP]``), so any pair template works, not only BERT's.
    """
    enc = tokenizer("a", "b", add_special_tokens=True)
    seq = enc.sequence_ids()
    ids = enc["input_ids"]
    first_b = seq.index(1)
    last_a = max(k for k, s in enumerate(seq) if s == 0)
    last_b = max(k for k, s in enumerate(seq) if s == 1)
    return list(ids[: seq.index(0)]), list(ids[last_a + 1: first_b]), list(ids[last_b + 1:])


def _encode(tokenizer, text: str, offsets: bool):
    if offsets:
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError("character offsets need a fast (Rust) tokenizer; this one is a slow Python tokenizer")
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]
    return tokenizer(text, add_special_tokens=False)["input_ids"], None


def encode_response(tokenizer, response: str) -> list[int]:
    """The response's token ids as every layout tokenises it (no special tokens, nothing cut)."""
    return _encode(tokenizer, response, False)[0]


def check_view(tokenizer, view: str) -> None:
    """Refuse a view the tokenizer's layout cannot take (``echo`` is for decoder layouts)."""
    if view not in VIEWS:
        raise ConfigError(f"unknown token view {view!r} (known: {', '.join(VIEWS)})")
    if view == "echo" and is_encoder_style(tokenizer):
        raise ConfigError("--token-view echo is for decoder backbones; an encoder already lets every token see the "
                          "whole response (use --token-view causal)")


def decoder_layout(prompt_ids: Sequence[int], response_ids: Sequence[int], eos_id: int, *, max_length: int,
                   view: str = "causal") -> tuple[list[int], int, int, int, bool]:
    """(ids, response_start, response_end, kept response tokens, truncated) of the decoder layout.

    ``causal``: prompt + response + [EOS]; ``echo``: prompt + response + [EOS] + response + [EOS],
    scored on the second copy. Truncation policy of the module docstring.

    >>> decoder_layout([1, 2], [5, 6], 0, max_length=10, view="echo")
    ([1, 2, 5, 6, 0, 5, 6, 0], 5, 8, 2, False)
    >>> decoder_layout([1, 2, 3], [5, 6, 7], 0, max_length=5)   # the prompt is cut from its left
    ([3, 5, 6, 7, 0], 1, 5, 3, True)
    """
    copies = 2 if view == "echo" else 1
    budget = max_length - copies                      # room for tokens besides the closing EOS(es)
    if budget < copies:
        raise ConfigError(f"--max-length {max_length} leaves no room for a response: the reward model's input "
                          f"adds {copies} special token(s) and {view} needs {copies} response token(s); use at "
                          f"least {2 * copies}")
    r_ids = list(response_ids)[: budget // copies]
    keep_prompt = budget - copies * len(r_ids)
    p_ids = list(prompt_ids)[max(0, len(prompt_ids) - keep_prompt):] if keep_prompt > 0 else []
    truncated = len(r_ids) < len(response_ids) or len(p_ids) < len(prompt_ids)
    ids = p_ids + r_ids + [eos_id]
    if view == "echo":
        ids += r_ids + [eos_id]
    return ids, len(ids) - len(r_ids) - 1, len(ids), len(r_ids), truncated


def build_rm_example(tokenizer, prompt: str, response: str, *, max_length: int, template: str | None = None,
                     with_offsets: bool = False, view: str = "causal") -> RMExample:
    """Tokenise one (prompt, response) for a reward model under the truncation policy above."""
    check_view(tokenizer, view)
    encoder = is_encoder_style(tokenizer)
    p_ids, _ = _encode(tokenizer, prompt if encoder else format_prompt(tokenizer, prompt, template), False)
    r_ids, r_off = _encode(tokenizer, response, with_offsets)
    end_off = [(len(response), len(response))]
    if not encoder:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ConfigError("the reward model's tokenizer has no EOS token to close responses with")
        ids, start, end, kept, truncated = decoder_layout(p_ids, r_ids, eos, max_length=max_length, view=view)
        offsets = (list(r_off[:kept]) + end_off) if r_off is not None else []
        return RMExample(ids, start, end, offsets, truncated)
    head, mid, tail = pair_special_layout(tokenizer)
    budget = max_length - len(head) - len(mid) - len(tail)
    if budget < 1:
        n_special = len(head) + len(mid) + len(tail)
        raise ConfigError(f"--max-length {max_length} leaves no room for a response: the reward model's input "
                          f"adds {n_special} special token(s); use at least {n_special + 1}")
    truncated = False
    if len(r_ids) > budget:
        r_ids, truncated = r_ids[:budget], True
        r_off = r_off[:budget] if r_off is not None else None
    keep_prompt = budget - len(r_ids)
    if len(p_ids) > keep_prompt:
        p_ids, truncated = (p_ids[len(p_ids) - keep_prompt:] if keep_prompt > 0 else []), True
    offsets = (list(r_off) + end_off) if r_off is not None else []
    ids = head + list(p_ids) + mid + list(r_ids) + tail
    return RMExample(ids, len(head) + len(p_ids) + len(mid), len(ids), offsets, truncated)


def rm_example_from_ids(prompt_ids: Sequence[int], response_ids: Sequence[int], eos_id: int, max_length: int,
                        view: str = "causal") -> RMExample:
    """The decoder layout of :func:`build_rm_example` built from ids a policy produced (no offsets).

    ``response_ids`` must not include the EOS: the closing EOS is appended here, as in RM training.
    """
    ids, start, end, _, truncated = decoder_layout(prompt_ids, response_ids, eos_id, max_length=max_length,
                                                   view=view)
    return RMExample(ids, start, end, [], truncated)
