"""Prompt formatting and batched sampling, shared by SFT, PPO rollouts and `finegrain generate`.

One rule for turning a user prompt into model input everywhere: the tokenizer's chat template
when it has one (a single user turn, generation prompt added), else ``template`` with
``{prompt}`` replaced. Prompt and response are tokenised separately, so the boundary between
them is the same in training, rollouts and scoring (DESIGN.md decision 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

DEFAULT_TEMPLATE = "{prompt}\n"


def format_prompt(tokenizer, prompt: str, template: str | None = None, *, use_chat_template: bool = True) -> str:
    if use_chat_template and template is None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return (template or DEFAULT_TEMPLATE).replace("{prompt}", prompt)


def encode_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text with no special tokens added (templates carry their own)."""
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids and attention mask, padded on the left (what decoder generation needs)."""
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s):] = torch.as_tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids and mask padded on the right."""
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
    return ids, mask


@dataclass
class Generated:
    """A batch of sampled responses.

    query_ids:     (B, Lq) prompt ids, left-padded; query_mask marks real tokens
    response_ids:  (B, Lr) sampled ids, right-padded with pad; response_mask marks real tokens
                   (up to and including the first EOS)
    ended:         (B,) True where the response emitted EOS
    texts:         decoded responses without special tokens
    """

    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    ended: torch.Tensor
    texts: list[str]


@torch.inference_mode()
def sample(model, tokenizer, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, do_sample: bool = True, generator_seed: int | None = None) -> Generated:
    """Sample one response per prompt with the KV cache; cut each response after its first EOS."""
    eos = tokenizer.eos_token_id
    if eos is None:
        from .errors import ConfigError

        raise ConfigError("the policy's tokenizer has no EOS token; responses could never end")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(model.parameters()).device
    q_ids, q_mask = left_pad(prompt_ids, pad)
    q_ids, q_mask = q_ids.to(device), q_mask.to(device)
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    kw = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad,
              use_cache=True)
    if do_sample:
        kw.update(temperature=max(temperature, 1e-5), top_k=top_k if top_k > 0 else 0, top_p=top_p)
    unwrapped = getattr(model, "module", model)
    out = unwrapped.generate(input_ids=q_ids, attention_mask=q_mask, **kw)
    resp = out[:, q_ids.shape[1]:].cpu()
    is_eos = resp == eos
    ended = is_eos.any(dim=1)
    # position of the first EOS (or the end): keep tokens up to and including it
    first = torch.where(ended, is_eos.float().argmax(dim=1), torch.full_like(ended, resp.shape[1], dtype=torch.long))
    positions = torch.arange(resp.shape[1]).unsqueeze(0)
    r_mask = (positions <= first.unsqueeze(1)).long() & (positions < resp.shape[1]).long()
    resp = torch.where(r_mask.bool(), resp, torch.full_like(resp, pad))
    texts = tokenizer.batch_decode([r[m.bool()].tolist() for r, m in zip(resp, r_mask)], skip_special_tokens=True)
    return Generated(q_ids.cpu(), q_mask.cpu(), resp, r_mask, ended, texts)


def generate_texts(model, tokenizer, prompts: Sequence[str], *, template: str | None = None, batch_size: int = 8,
                   max_new_tokens: int = 128, temperature: float = 0.7, top_p: float = 1.0, top_k: int = 0,
                   do_sample: bool = True, max_prompt_tokens: int | None = None, progress_desc: str | None = None,
                   seed: int = 0) -> list[str]:
    """Responses (decoded text) for plain-text prompts, batched, sorted by length for less padding."""
    from .tracking import progress

    formatted = [format_prompt(tokenizer, p, template) for p in prompts]
    ids = encode_texts(tokenizer, formatted)
    if max_prompt_tokens:
        ids = [s[-max_prompt_tokens:] for s in ids]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[str] = [""] * len(ids)
    bar = progress(total=len(ids), desc=progress_desc or "generate")
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        g = sample(model, tokenizer, [ids[i] for i in idx], max_new_tokens=max_new_tokens, temperature=temperature,
                   top_k=top_k, top_p=top_p, do_sample=do_sample, generator_seed=seed + start)
        for i, t in zip(idx, g.texts):
            out[i] = t
        bar.update(len(idx))
    bar.close()
    return out
