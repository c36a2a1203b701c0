"""Batched sampling, shared by PPO rollouts, `finegrain generate` and the local edit backend.

Prompts are formatted, tokenised and padded by :mod:`finegrain.tokens` (the one prompt rule).

Sampling runs finegrain's own KV-cache decoding loop (:func:`sample`): the same temperature /
top-k / top-p filtering as transformers' ``generate``, tokens drawn by inverse CDF. A model
whose ``generation_config`` asks for anything else (repetition penalties, suppressed tokens,
beams, ...) is sampled with ``generate``; speed switch ``decoder`` (:mod:`finegrain.speed`,
``FINEGRAIN_DECODER=generate``) forces that.
"""
from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from . import speed
from .errors import ConfigError
from .speed import base_model, forward_params
from .tokens import encode_prompts, format_prompt, leading_bos, left_pad

logger = logging.getLogger(__name__)

@dataclass
class Generated:
    """A batch of sampled responses.

    query_ids:     (B, Lq) prompt ids, left-padded; query_mask marks real tokens
    response_ids:  (B, Lr) sampled ids, right-padded with pad; response_mask marks real tokens
                   (up to and including the first EOS: any of :func:`stop_token_ids`)
    ended:         (B,) True where the response emitted EOS
    texts:         decoded responses without special tokens
    """

    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    ended: torch.Tensor
    texts: list[str]


# generation_config fields the decoding loop below honours, or that cannot change what is
# sampled (beam-search settings while num_beams is 1, output flags, cache and compile choices);
# a model whose generation_config sets any other field to something that acts decodes with
# transformers' ``generate``, which applies every logits processor.
_LOOP_FIELDS = frozenset({
    "bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "min_new_tokens", "max_length",
    "max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "use_cache", "transformers_version",
    "_from_model_config", "return_dict_in_generate", "output_scores", "output_logits", "output_attentions",
    "output_hidden_states", "length_penalty", "early_stopping", "cache_implementation", "cache_config",
    "compile_config", "disable_compile", "low_memory", "prefill_chunk_size",
})
# values with which a logits processor or search setting does nothing (configs often spell them out)
_NO_OP = {"repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
          "encoder_no_repeat_ngram_size": 0, "num_beams": 1, "num_beam_groups": 1, "num_return_sequences": 1,
          "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "min_p": 0.0, "diversity_penalty": 0.0,
          "min_length": 0, "guidance_scale": 1.0, "renormalize_logits": False, "remove_invalid_values": False}


def loop_unsupported(model) -> str | None:
    """Why :func:`sample` cannot use its own decoding loop for ``model`` (None when it can).

    The loop covers decoder-only causal LMs whose forward takes position ids and a KV cache,
    with a generation_config that asks for nothing beyond minimum new tokens, temperature,
    top-k and top-p (repetition penalties, suppressed tokens, beams and the like go to
    transformers' ``generate``).
    """
    base = base_model(model)
    config = getattr(base, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return "not a decoder-only transformers model"
    params = forward_params(model)
    if "position_ids" not in params or not ({"cache", "past_key_values"} & params):
        return "its forward takes no position ids or KV cache"
    gen_config = getattr(base, "generation_config", None)
    if gen_config is not None:
        acting = sorted(k for k, v in gen_config.to_diff_dict().items()
                        if k not in _LOOP_FIELDS and v not in (None, [], {}) and _NO_OP.get(k, object()) != v)
        if acting:
            return f"its generation_config sets {', '.join(acting)}"
    return None


def draw_tokens(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of ``probs`` (B, V) by inverse CDF: the first index whose cumulative mass exceeds u * total.

    ``u`` (B,) are uniforms in [0, 1). A token with probability 0 is never drawn (the search is
    strict, and u * total stays below the total), so masked tokens (EOS before the minimum
    length, tokens outside top-k/top-p) cannot come out. One uniform per row instead of
    ``torch.multinomial``'s exponential draw per vocabulary entry.
    """
    cdf = probs.float().cumsum(-1)
    total = cdf[:, -1:]
    x = torch.minimum(u.unsqueeze(-1).to(cdf.dtype) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, x, right=True).squeeze(-1)


def _warpers(temperature: float, top_k: int, top_p: float):
    """transformers' own temperature / top-k / top-p warpers, in ``generate``'s order (same filtering)."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    out = []
    if temperature != 1.0:
        out.append(TemperatureLogitsWarper(temperature))
    if top_k and top_k > 0:
        out.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        out.append(TopPLogitsWarper(top_p))
    return out


@functools.cache
def _preallocated_layer_class():
    """:class:`PreallocatedLayer`, built on first use (transformers' cache layers exist from 4.56 on), or None."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return None

    class PreallocatedLayer(DynamicLayer):
        """A dynamic cache layer that holds room for ``capacity`` positions from its first update.

        Each update writes the new keys and values after the filled ones; ``keys`` and ``values``
        are views of the filled part (B, H, filled, D), as the dynamic layer's concatenated
        tensors would be, without copying the whole cache at every decoded token. Past
        ``capacity`` it grows by doubling.
        """

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity = capacity
            self.filled = 0

        def lazy_initialization(self, key_states, value_states) -> None:
            self.device = key_states.device
            b, h, _, _ = key_states.shape
            self._k = key_states.new_empty((b, h, self.capacity, key_states.shape[-1]))
            self._v = value_states.new_empty((b, h, self.capacity, value_states.shape[-1]))
            self.filled = 0
            self.is_initialized = True

        def _view(self):
            self.keys, self.values = self._k[:, :, :self.filled], self._v[:, :, :self.filled]
            return self.keys, self.values

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n, m = self.filled, key_states.shape[-2]
            if n + m > self._k.shape[-2]:  # out of room: a block twice as large (or as large as needed)
                room = max(2 * self._k.shape[-2], n + m)
                grow = lambda t: torch.cat([t[:, :, :n], t.new_empty(t.shape[:2] + (room - n, t.shape[-1]))], 2)
                self._k, self._v = grow(self._k), grow(self._v)
            self._k[:, :, n:n + m] = key_states
            self._v[:, :, n:n + m] = value_states
            self.filled = n + m
            return self._view()

        def get_seq_length(self) -> int:
            return self.filled if self.is_initialized else 0

        def reset(self) -> None:
            self.filled = 0
            self.keys = self.values = None
            self.is_initialized = False

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove > 0:
                raise ValueError(f"crop takes the number of tokens to remove as a negative number, not {tokens_to_remove}")
            if tokens_to_remove and self.is_initialized:
                self.filled = max(0, self.filled + tokens_to_remove)
                self._view()

        def _rows(self, pick) -> None:
            if self.is_initialized:
                self._k, self._v = pick(self._k), pick(self._v)
                self._view()

        def batch_repeat_interleave(self, repeats: int) -> None:
            self._rows(lambda t: t.repeat_interleave(repeats, dim=0))

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            self._rows(lambda t: t[indices, ...])

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            self._rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    return PreallocatedLayer


def _reads_views_without_copy(config) -> bool:
    """Whether the model's attention reads a view of a preallocated cache at no more cost than a block.

    SDPA (and the other fused kernels) take the strided view as it is. Eager attention
    multiplies it with a batched matmul that copies a strided operand into a block first: the
    copy the dynamic cache's concatenation made, paid again in every layer (a tiny GPT-2 in bf16
    decoded 0.94-0.98x as fast). Grouped-query attention is the exception: eager attention
    repeats the key and value heads into a new block anyway (``repeat_kv``), so the view costs
    nothing there (SmolLM2: 1.04x).
    """
    from .models import RECOMPUTED_EAGER

    if getattr(config, "_attn_implementation", None) not in ("eager", RECOMPUTED_EAGER):
        return True
    heads, kv_heads = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    return heads is not None and kv_heads is not None and kv_heads < heads


def preallocated_cache(model, capacity: int):
    """A transformers ``DynamicCache`` for ``model`` whose layers hold ``capacity`` positions from the start.

    Only where every layer of the model's cache would be a plain dynamic (full-attention) layer
    and its attention reads a view at no extra cost (:func:`_reads_views_without_copy`); otherwise
    (sliding windows, linear attention, eager attention without grouped heads, an older
    transformers) None: the model builds its own cache as before. See :class:`PreallocatedLayer` and speed switch ``preallocated_kv_cache``.
    """
    layer = _preallocated_layer_class()
    config = getattr(model, "config", None)
    if layer is None or config is None or not _reads_views_without_copy(config):
        return None
    from transformers.cache_utils import DynamicCache, DynamicLayer

    try:
        cache = DynamicCache(config=config)
    except Exception:  # a config the cache cannot read its layer types from
        return None
    if not cache.layers or any(type(x) is not DynamicLayer for x in cache.layers):
        return None
    cache.layers = [layer(capacity) for _ in cache.layers]
    return cache


def longrope_switch_length(config) -> int | None:
    """The sequence length past which the model's LongRoPE rotates every position with its long factors, or None.

    LongRoPE (Phi-3 128k, Phi-3.5, Phi-4-mini) picks its RoPE frequencies from the longest position of
    each forward: the short factors up to ``original_max_position_embeddings``, the long ones past it,
    for every position at once. Keys cached while the sequence was shorter were rotated with the
    short ones; ``generate`` drops them when the sequence passes that length and runs it all again
    (Phi-3's ``prepare_inputs_for_generation``), and so does :func:`_decode_loop`. Other RoPE
    types rotate a position the same way whatever the length (or, "dynamic", are left as
    ``generate`` leaves them).
    """
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    per_layer_type = rope and all(isinstance(v, dict) for v in rope.values())  # {"full_attention": {...}, ...}
    for r in (rope.values() if per_layer_type else [rope]):
        if (r.get("rope_type") or r.get("type")) == "longrope":
            n = r.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings", None)
            return int(n) if n else None
    return None


def _decode_loop(model, q_ids, q_mask, *, max_new_tokens: int, eos: int | Sequence[int], pad: int,
                 min_new_tokens: int, do_sample: bool, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """(B, <= max_new_tokens) new token ids; rows that ended carry ``pad`` after their EOS.

    A KV-cache loop over the model's own forward: the prompt once (LM head on its last position
    only), then one token per step with position ids continuing each row's own count (the
    prompts are left-padded). ``eos``: the id, or the ids, that end a response (as
    ``generate``'s ``eos_token_id``). Stops when every row has emitted one. A LongRoPE model
    runs the whole sequence again, into a new cache, when it passes the length where its RoPE
    changes (:func:`longrope_switch_length`), as ``generate`` does.
    """
    stops = torch.as_tensor([eos] if isinstance(eos, int) else list(eos), dtype=torch.long, device=q_ids.device)
    params = forward_params(model)
    cache_kw = "cache" if "cache" in params else "past_key_values"
    keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    warpers = _warpers(max(temperature, 1e-5), top_k, top_p) if do_sample else []
    base = base_model(model)
    switch = longrope_switch_length(base.config) if getattr(base, "config", None) is not None else None

    def prefill(ids, mask):
        """Position ids and the forward of whole left-padded rows, into a new cache (LM head on the last position)."""
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = (preallocated_cache(model, q_ids.shape[1] + max_new_tokens) if speed.options().preallocated_kv_cache
                 else None)
        return pos, model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **keep,
                          **({cache_kw: cache} if cache is not None else {}))

    mask = q_mask
    pos, out = prefill(q_ids, mask)
    done = torch.zeros(q_ids.shape[0], dtype=torch.bool, device=q_ids.device)
    tokens = []
    for t in range(max_new_tokens):
        scores = out.logits[:, -1, :].float()
        if t < min_new_tokens:
            scores[:, stops] = float("-inf")
        for w in warpers:
            scores = w(None, scores)
        if do_sample:
            probs = torch.softmax(scores, dim=-1)
            nxt = draw_tokens(probs, torch.rand(probs.shape[0], device=probs.device))
        else:
            nxt = scores.argmax(dim=-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        tokens.append(nxt)
        done = done | torch.isin(nxt, stops)
        if t + 1 == max_new_tokens or bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if switch is not None and mask.shape[1] == switch + 1:  # LongRoPE turns to its long factors here
            pos, out = prefill(torch.cat([q_ids, torch.stack(tokens, dim=1)], dim=1), mask)
            continue
        pos = pos[:, -1:] + 1
        cache = out.get("cache")
        if cache is None:
            cache = out.get("past_key_values")
        if t == 0 and (cache is None or (hasattr(cache, "get_seq_length") and not cache.get_seq_length())):
            # nothing cached: the next forward would read the new token alone, without its context
            raise ConfigError("the model returned no KV cache to decode with (gradient checkpointing turns it off "
                              "in training mode); sample with the model in eval mode (model.eval())")
        out = model(input_ids=nxt.unsqueeze(-1), attention_mask=mask, position_ids=pos, use_cache=True,
                    **{cache_kw: cache})
    if not tokens:
        return q_ids.new_zeros((q_ids.shape[0], 0))
    return torch.stack(tokens, dim=1)


def stop_token_ids(tokenizer, model) -> list[int]:
    """The ids that end a sampled response: the tokenizer's EOS, then every other EOS id the model's
    ``generation_config`` names (as ``generate`` stops on them).

    Chat models often end a turn with a token of their own besides the tokenizer's EOS (Gemma's
    ``<end_of_turn>``, Llama 3's ``<|eot_id|>``, Qwen's ``<|im_end|>``), listed in
    ``generation_config.eos_token_id``; without them a response would run on past its turn.
    """
    base = base_model(model)
    named = getattr(getattr(base, "generation_config", None), "eos_token_id", None)
    named = [] if named is None else [named] if isinstance(named, int) else list(named)
    return list(dict.fromkeys([int(tokenizer.eos_token_id)] + [int(x) for x in named]))


@speed.sampling_grad_mode  # no_grad, not inference_mode: autocast caches its bf16 weight copies only outside it
def sample(model, tokenizer, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, do_sample: bool = True, generator_seed: int | None = None,
           decoder: str | None = None) -> Generated:
    """Sample one response per prompt with the KV cache; cut each response after its first EOS.

    ``decoder``: ``"loop"`` is finegrain's decoding loop (:func:`_decode_loop`; same filtering
    as ``generate``, tokens drawn by :func:`draw_tokens`), ``"generate"`` is transformers'
    ``generate``, ``"auto"`` the loop whenever :func:`loop_unsupported` finds nothing against it.
    Unset, it is the speed switch ``decoder`` (:func:`finegrain.speed.decoder`: the environment's
    ``FINEGRAIN_DECODER``, else ``"auto"``). A peft LoRA model samples with its updates merged
    into its weights (:func:`finegrain.speed.merged_lora`; switch ``merge_lora_sampling``), a bf16
    one on a CPU through weights packed for oneDNN (:func:`finegrain.speed.packed_linear_weights`), and a
    policy whose eager attention ``auto`` chose through SDPA (:func:`finegrain.speed.sdpa_sampling`).
    """
    decoder = speed.decoder(decoder)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the policy's tokenizer has no EOS token; responses could never end")
    empty = next((i for i, p in enumerate(prompt_ids) if not len(p)), None)
    if empty is not None:
        raise ConfigError(f"prompt {empty + 1} of the batch has no tokens; a decoder needs at least one to continue")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    unwrapped = getattr(model, "module", model)
    stops = stop_token_ids(tokenizer, unwrapped)
    device = next(model.parameters()).device
    q_ids, q_mask = left_pad(prompt_ids, pad)
    q_ids, q_mask = q_ids.to(device), q_mask.to(device)
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    why_not = loop_unsupported(unwrapped) if decoder != "generate" else "generate asked for"
    if decoder == "loop" and why_not:
        raise ConfigError(f"finegrain's decoding loop cannot run this model: {why_not}")
    # a LoRA policy samples through merged weights (switch merge_lora_sampling); bf16 products through weights
    # packed for oneDNN once per call (switch packed_sampling_weights); attention through SDPA where auto chose
    # eager for the training forwards (switch sdpa_sampling)
    with speed.merged_lora(unwrapped), speed.packed_linear_weights(unwrapped, rows=q_ids.shape[0]), \
            speed.sdpa_sampling(unwrapped):
        if why_not is None:
            gen_config = getattr(unwrapped, "generation_config", None)
            resp = _decode_loop(unwrapped, q_ids, q_mask, max_new_tokens=max_new_tokens, eos=stops, pad=pad,
                                min_new_tokens=int(getattr(gen_config, "min_new_tokens", None) or 0),
                                do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p).cpu()
        else:
            kw = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad,
                      use_cache=True)
            if do_sample:
                kw.update(temperature=max(temperature, 1e-5), top_k=top_k if top_k > 0 else 0, top_p=top_p)
            out = unwrapped.generate(input_ids=q_ids, attention_mask=q_mask, **kw)
            resp = out[:, q_ids.shape[1]:].cpu()
    is_eos = torch.isin(resp, torch.tensor(stops, dtype=resp.dtype))
    ended = is_eos.any(dim=1)
    # position of the first EOS (or the end): keep tokens up to and including it
    first = torch.where(ended, is_eos.float().argmax(dim=1), torch.full_like(ended, resp.shape[1], dtype=torch.long))
    positions = torch.arange(resp.shape[1]).unsqueeze(0)
    r_mask = (positions <= first.unsqueeze(1)).long()
    resp = torch.where(r_mask.bool(), resp, torch.full_like(resp, pad))
    texts = tokenizer.batch_decode([r[m.bool()].tolist() for r, m in zip(resp, r_mask)], skip_special_tokens=True)
    return Generated(q_ids.cpu(), q_mask.cpu(), resp, r_mask, ended, texts)


def batch_seed(seed: int, start: int) -> int:
    """The sampling seed of the batch that starts at position ``start`` of a run seeded ``seed``: a hash of both.

    Not ``seed + start``: with it, runs whose seeds differ by a multiple of the batch size (``--seed 0`` and
    ``--seed 16`` at batch 16) drew every batch but one with another run's random stream, coupling samples that
    were meant to be independent (two candidate responses per prompt, say).
    """
    return hashed_seed(f"finegrain-generate:{seed}:{start}")


def hashed_seed(text: str) -> int:
    """A 63-bit seed (any torch.manual_seed takes it) hashed from ``text``: equal texts, equal seeds."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def generate_texts(model, tokenizer, prompts: Sequence[str], *, template: str | None = None, batch_size: int = 8,
                   max_new_tokens: int = 128, temperature: float = 0.7, top_p: float = 1.0, top_k: int = 0,
                   do_sample: bool = True, max_prompt_tokens: int | None = None, progress_desc: str | None = None,
                   seed: int = 0, done: dict[int, str] | None = None,
                   on_batch: Callable[[list[int], list[str]], None] | None = None) -> list[str]:
    """Responses (decoded text) for plain-text prompts, batched, sorted by length for less padding.

    A prompt is cut from its left (its end, next to the response, stays) to ``max_prompt_tokens``
    and to what the model's context leaves beside ``max_new_tokens``, with one warning line.
    Each batch samples with a seed drawn from ``seed`` and its first position in the length order
    (`batch_seed`), so a batch whose prompts are all in ``done`` (prompt index -> text, from an
    interrupted run with the same settings) is skipped and the result is the one an uninterrupted
    run gives; ``on_batch(indices, texts)`` is called after each generated batch (what a resumable
    caller stores).
    """
    from .models import context_length
    from .tracking import progress

    formatted = [format_prompt(tokenizer, p, template) for p in prompts]
    ids = encode_prompts(tokenizer, formatted)
    base = base_model(getattr(model, "module", model))
    ctx = context_length(base.config) if getattr(base, "config", None) is not None else None
    limit = max_prompt_tokens or None
    if ctx is not None:
        if max_new_tokens >= ctx:
            raise ConfigError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's context "
                              f"of {ctx} tokens")
        longest = max(map(len, ids), default=0)
        if longest > ctx - max_new_tokens and (limit is None or limit > ctx - max_new_tokens):
            n_cut = sum(len(s) > ctx - max_new_tokens for s in ids)
            logger.warning("%d prompt(s) longer than the %d tokens that the model's context of %d leaves beside "
                           "--max-new-tokens %d (the longest: %d); keeping the last %d tokens of each", n_cut,
                           ctx - max_new_tokens, ctx, max_new_tokens, longest, ctx - max_new_tokens)
            limit = ctx - max_new_tokens
    if limit:
        bos = leading_bos(tokenizer)  # a cut prompt keeps its BOS
        ids = [s if len(s) <= limit else ([bos] + s[1 - limit:] if bos is not None and s[0] == bos and limit > 1
                                          else s[-limit:]) for s in ids]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[str] = [""] * len(ids)
    done = done or {}
    bar = progress(total=len(ids), desc=progress_desc or "generate")
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        if all(i in done for i in idx):
            texts = [done[i] for i in idx]
        else:
            texts = sample(model, tokenizer, [ids[i] for i in idx], max_new_tokens=max_new_tokens,
                           temperature=temperature, top_k=top_k, top_p=top_p, do_sample=do_sample,
                           generator_seed=batch_seed(seed, start)).texts
            if on_batch is not None:
                on_batch(idx, texts)
        for i, t in zip(idx, texts):
            out[i] = t
        bar.update(len(idx))
    bar.close()
    return out
