"""How a (prompt, response) becomes reward-model input: one rule for training, evaluation and PPO.

Prompt and response are tokenised separately and concatenated, so the prompt/response boundary
is identical for both sides of a pair (DESIGN.md decision 1):

- decoder tokenizers (no special tokens added for pairs; GPT-2, Llama, Qwen2, SmolLM2):
  ``format_prompt(prompt) ids + response ids + [EOS]``
- encoder tokenizers (BERT-like, add special tokens for pairs):
  ``[CLS] prompt [SEP] response [SEP]``; the closing special token plays the role of EOS.

The response's scored positions are its tokens plus that closing token, so "the token after an
edit" always exists (the divergence-point rule of the alignment can land on it).

Truncation (one policy, applied to both sides of a pair alike): the response keeps priority.
The prompt is cut from the left (its end, closest to the response, stays) until everything fits;
if the response alone is still too long, it is cut on the right, keeping its closing token.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..generation import format_prompt


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
            from ..errors import ConfigError

            raise ConfigError("character offsets need a fast (Rust) tokenizer; this one is a slow Python tokenizer")
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]
    return tokenizer(text, add_special_tokens=False)["input_ids"], None


def build_rm_example(tokenizer, prompt: str, response: str, *, max_length: int, template: str | None = None,
                     with_offsets: bool = False) -> RMExample:
    """Tokenise one (prompt, response) for a reward model under the truncation policy above."""
    if is_encoder_style(tokenizer):
        p_ids, _ = _encode(tokenizer, prompt, False)
    else:
        p_ids, _ = _encode(tokenizer, format_prompt(tokenizer, prompt, template), False)
    r_ids, r_off = _encode(tokenizer, response, with_offsets)
    n_special = sum(map(len, pair_special_layout(tokenizer))) if is_encoder_style(tokenizer) else 1
    budget = max_length - n_special
    if budget < 1:
        from ..errors import ConfigError

        raise ConfigError(f"--max-length {max_length} leaves no room for a response: the reward model's input "
                          f"adds {n_special} special token(s); use at least {n_special + 1}")
    truncated = False
    if len(r_ids) > budget:
        r_ids, truncated = r_ids[:budget], True
        r_off = r_off[:budget] if r_off is not None else None
    keep_prompt = budget - len(r_ids)
    if len(p_ids) > keep_prompt:
        p_ids, truncated = (p_ids[len(p_ids) - keep_prompt:] if keep_prompt > 0 else []), True
    end_off = [(len(response), len(response))]
    offsets = (list(r_off) + end_off) if r_off is not None else []
    if is_encoder_style(tokenizer):
        head, mid, tail = pair_special_layout(tokenizer)
        ids = head + list(p_ids) + mid + list(r_ids) + tail
        start = len(head) + len(p_ids) + len(mid)
        return RMExample(ids, start, len(ids), offsets, truncated)
    eos = tokenizer.eos_token_id
    if eos is None:
        from ..errors import ConfigError

        raise ConfigError("the reward model's tokenizer has no EOS token to close responses with")
    ids = list(p_ids) + list(r_ids) + [eos]
    return RMExample(ids, len(p_ids), len(ids), offsets, truncated)
