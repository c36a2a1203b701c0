"""How a (prompt, response) becomes reward-model input: one rule for training, evaluation and PPO.

Prompt and response are tokenised separately and concatenated, so the prompt/response boundary
is identical for both sides of a pair (DESIGN.md decision 1):

- decoder tokenizers (no special token closing a pair; GPT-2, Llama, Qwen2, SmolLM2; a BOS before each text is fine):
  ``format_prompt(prompt) ids + response ids + [EOS]``, the layout SFT trains on too
  (:func:`finegrain.tokens.decoder_example`)
- encoder tokenizers (BERT-like, a special token closes a pair, :func:`finegrain.tokens.is_encoder_style`):
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

from typing import Sequence

from ..errors import ConfigError
from ..tokens import PromptResponse, decoder_example, decoder_layout, encode_text, is_encoder_style

VIEWS = ("causal", "echo")

RMExample = PromptResponse  # a reward model's input is the shared prompt + response layout of finegrain.tokens


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


def check_view(tokenizer, view: str) -> None:
    """Refuse a view the tokenizer's layout cannot take (``echo`` is for decoder layouts)."""
    if view not in VIEWS:
        raise ConfigError(f"unknown token view {view!r} (known: {', '.join(VIEWS)})")
    if view == "echo" and is_encoder_style(tokenizer):
        raise ConfigError("--token-view echo is for decoder backbones; an encoder already lets every token see the "
                          "whole response (use --token-view causal)")


def copies_of(view: str) -> int:
    """How many times a view gives the response: twice for ``echo``, once for ``causal``."""
    return 2 if view == "echo" else 1


def build_rm_example(tokenizer, prompt: str, response: str, *, max_length: int, template: str | None = None,
                     with_offsets: bool = False, view: str = "causal") -> RMExample:
    """Tokenise one (prompt, response) for a reward model under the truncation policy above."""
    check_view(tokenizer, view)
    if not is_encoder_style(tokenizer):
        return decoder_example(tokenizer, prompt, response, max_length=max_length, template=template,
                               with_offsets=with_offsets, copies=copies_of(view))
    p_ids, _ = encode_text(tokenizer, prompt)
    r_ids, r_off = encode_text(tokenizer, response, with_offsets)
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
    offsets = (list(r_off) + [(len(response), len(response))]) if r_off is not None else []
    ids = head + list(p_ids) + mid + list(r_ids) + tail
    return RMExample(ids, len(head) + len(p_ids) + len(mid), len(ids), offsets, truncated)


def rm_example_from_ids(prompt_ids: Sequence[int], response_ids: Sequence[int], eos_id: int, max_length: int,
                        view: str = "causal") -> RMExample:
    """The decoder layout of :func:`build_rm_example` built from ids a policy produced (no offsets).

    ``response_ids`` must not include the EOS: the closing EOS is appended here, as in RM training.

    >>> rm_example_from_ids([1, 2], [5, 6], 0, 10, "echo").input_ids   # the echo view: the response twice
    [1, 2, 5, 6, 0, 5, 6, 0]
    """
    ids, start, end, _, truncated = decoder_layout(prompt_ids, response_ids, eos_id, max_length=max_length,
                                                   copies=copies_of(view))
    return RMExample(ids, start, end, [], truncated)
