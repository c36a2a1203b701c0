"""finegrain's decoding loop (`generation._decode_loop`) against transformers' `generate`.

Greedy decoding must give the same tokens as `generate` (left padding, EOS, minimum lengths);
sampling draws by inverse CDF, so it is checked for what it must be: a draw from exactly the
distribution `generate` samples from (same temperature / top-k / top-p filtering), never a
masked token, and with the right frequencies.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_tiny_model
from finegrain.errors import ConfigError
from finegrain.generation import _warpers, draw_tokens, loop_unsupported, sample
from finegrain.tokens import encode_texts

PROMPTS = ["The capital of", "Step 1: preheat the oven", "Paris", "I am sorry, but I cannot help",
           "Question: how tall"]


@pytest.fixture(scope="module")
def prompt_ids(tiny_tokenizer):
    ids = encode_texts(tiny_tokenizer, PROMPTS)
    assert len({len(x) for x in ids}) > 2  # the batch is left-padded to different lengths
    return ids


def _stub_tokenizer(eos: int, pad: int):
    return SimpleNamespace(eos_token_id=eos, pad_token_id=pad,
                           batch_decode=lambda seqs, skip_special_tokens=True: [" ".join(map(str, s)) for s in seqs])


def test_draw_tokens_hand_computed():
    probs = torch.tensor([[0.25, 0.25, 0.5]] * 6)
    u = torch.tensor([0.0, 0.2, 0.25, 0.49, 0.5, 0.9999999])
    # cumulative 0.25, 0.5, 1.0: token i is drawn for u in [cdf[i-1], cdf[i])
    assert draw_tokens(probs, u).tolist() == [0, 0, 1, 1, 2, 2]
    # zero-probability tokens are never drawn, even at u = 0 and u -> 1
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]] * 4)
    below_one = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)).item()
    assert draw_tokens(probs, torch.tensor([0.0, 0.4999, 0.5, below_one])).tolist() == [1, 1, 3, 3]
    # unnormalised rows are fine: the draw is relative to the row's total
    assert draw_tokens(torch.tensor([[2.0, 6.0]]), torch.tensor([0.26])).tolist() == [1]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([0.0, 0.0, 1e-8, 1e-3, 0.1, 0.5, 1.0, 7.0]), min_size=1, max_size=40)
       .filter(lambda xs: sum(xs) > 0),
       st.one_of(st.floats(0.0, 1.0, exclude_max=True), st.just(0.0),
                 st.just(float(torch.nextafter(torch.tensor(1.0), torch.tensor(0.0))))))
def test_draw_tokens_property(weights, u):
    probs = torch.tensor([weights], dtype=torch.float32)
    idx = draw_tokens(probs, torch.tensor([u])).item()
    assert 0 <= idx < len(weights) and weights[idx] > 0  # only tokens with mass
    cdf = probs.cumsum(-1)[0]
    # the point the draw searches for, in the float32 arithmetic the draw uses (u * total rounds in float32)
    x = min((torch.tensor(u, dtype=torch.float32) * cdf[-1]).item(), torch.nextafter(cdf[-1], torch.tensor(0.0)).item())
    lo = cdf[idx - 1].item() if idx else 0.0
    assert lo <= x < cdf[idx].item()  # the inverse CDF: the interval u falls in


def test_draw_tokens_frequencies():
    torch.manual_seed(0)
    p = torch.tensor([0.05, 0.0, 0.15, 0.3, 0.0, 0.5])
    n = 200_000
    idx = draw_tokens(p.expand(n, -1), torch.rand(n))
    freq = torch.bincount(idx, minlength=len(p)).float() / n
    sigma = (p * (1 - p) / n).sqrt()
    assert freq[p == 0].sum() == 0
    assert ((freq - p).abs() <= 5 * sigma + 1e-9).all(), (freq, p)


def test_greedy_loop_equals_generate(sharp_model, tiny_tokenizer, prompt_ids):
    a = sample(sharp_model, tiny_tokenizer, prompt_ids, max_new_tokens=12, do_sample=False, decoder="loop")
    b = sample(sharp_model, tiny_tokenizer, prompt_ids, max_new_tokens=12, do_sample=False, decoder="generate")
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.response_mask, b.response_mask)
    assert a.texts == b.texts
    assert len({tuple(r.tolist()) for r in a.response_ids}) == len(PROMPTS)  # not a degenerate model


def test_loop_stops_rows_at_eos_like_generate(sharp_model, tiny_tokenizer, prompt_ids):
    ref = sample(sharp_model, tiny_tokenizer, prompt_ids, max_new_tokens=12, do_sample=False, decoder="generate")
    eos = int(ref.response_ids[0, 3])  # make a token row 0 emits at step 3 the EOS
    pad = tiny_tokenizer.pad_token_id if tiny_tokenizer.pad_token_id != eos else eos + 1
    tok = _stub_tokenizer(eos, pad)
    a = sample(sharp_model, tok, prompt_ids, max_new_tokens=12, do_sample=False, decoder="loop")
    b = sample(sharp_model, tok, prompt_ids, max_new_tokens=12, do_sample=False, decoder="generate")
    assert a.ended[0] and int(a.response_mask[0].sum()) <= 4
    assert torch.equal(a.ended, b.ended) and torch.equal(a.response_mask, b.response_mask)
    assert torch.equal(a.response_ids, b.response_ids)
    assert (a.response_ids[~a.response_mask.bool()] == pad).all()

    # a minimum length masks that EOS for the first 6 tokens, in both decoders
    sharp_model.generation_config.min_new_tokens = 6
    try:
        assert loop_unsupported(sharp_model) is None
        a = sample(sharp_model, tok, prompt_ids, max_new_tokens=12, do_sample=False, decoder="loop")
        b = sample(sharp_model, tok, prompt_ids, max_new_tokens=12, do_sample=False, decoder="generate")
    finally:
        sharp_model.generation_config.min_new_tokens = None
    assert torch.equal(a.response_ids, b.response_ids)
    assert not (a.response_ids[:, :6] == eos).any()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 20, 1.0), (1.3, 0, 0.8), (0.8, 50, 0.9)])
def test_sampled_tokens_follow_generates_distribution(tiny_tokenizer, temperature, top_k, top_p):
    """First tokens of N copies of one prompt against the exact warped distribution `generate` samples from."""
    m = make_tiny_model(tiny_tokenizer, "causal", seed=1).eval()
    with torch.no_grad():  # scaled so the next-token distribution has a perplexity of ~30, not ~370
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(16)
    ids = encode_texts(tiny_tokenizer, ["Here is a list:"])[0]
    with torch.no_grad():
        scores = m(input_ids=torch.tensor([ids])).logits[:, -1].float()
        for w in _warpers(temperature, top_k, top_p):
            scores = w(None, scores)
        target = torch.softmax(scores, -1)[0]
    n = 6000
    g = sample(m, tiny_tokenizer, [ids] * n, max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p,
               generator_seed=3, decoder="loop")
    freq = torch.bincount(g.response_ids[:, 0], minlength=len(target)).float() / n
    assert freq[target == 0].sum() == 0  # nothing outside the filtered support
    if top_k:
        assert int((target > 0).sum()) <= top_k
    sigma = (target * (1 - target) / n).sqrt()
    assert ((freq - target).abs() <= 5 * sigma + 2 / n).all()
    # and a chi-square statistic that a sampler from another distribution would fail
    support = target > 5 / n
    chi2 = float((((freq - target)[support]) ** 2 / target[support]).sum() * n)
    dof = int(support.sum()) - 1
    assert chi2 < dof + 5 * math.sqrt(2 * dof), (chi2, dof)


def test_sampling_is_seeded_and_never_ends_before_min_length(tiny_tokenizer, prompt_ids):
    m = make_tiny_model(tiny_tokenizer, "causal", seed=2).eval()
    eos = tiny_tokenizer.eos_token_id
    with torch.no_grad():  # make EOS the likeliest token everywhere: +8 on its logit (tied head)
        w = m.lm_head.weight[eos]
        m.transformer.ln_f.bias += 8 * w / w.norm() ** 2
    m.generation_config.min_new_tokens = 4
    a = sample(m, tiny_tokenizer, prompt_ids * 8, max_new_tokens=10, generator_seed=5, decoder="loop")
    b = sample(m, tiny_tokenizer, prompt_ids * 8, max_new_tokens=10, generator_seed=5, decoder="loop")
    assert torch.equal(a.response_ids, b.response_ids)
    assert a.ended.all() and (a.response_mask.sum(1) >= 5).all()  # EOS at position >= 4 (0-based)
    assert not (a.response_ids[:, :4] == eos).any()


def test_models_the_loop_cannot_run_fall_back_to_generate(sharp_model, tiny_tokenizer, prompt_ids):
    assert loop_unsupported(sharp_model) is None
    gc = sharp_model.generation_config
    for field, value in [("repetition_penalty", 1.3), ("suppress_tokens", [5]), ("no_repeat_ngram_size", 2)]:
        setattr(gc, field, value)
        try:
            assert field in (loop_unsupported(sharp_model) or "")
            with pytest.raises(ConfigError, match=field):
                sample(sharp_model, tiny_tokenizer, prompt_ids, max_new_tokens=4, decoder="loop")
            auto = sample(sharp_model, tiny_tokenizer, prompt_ids, max_new_tokens=8, do_sample=False)
            gen = sample(sharp_model, tiny_tokenizer, prompt_ids, max_new_tokens=8, do_sample=False,
                         decoder="generate")
            assert torch.equal(auto.response_ids, gen.response_ids)  # auto went to generate, processors applied
        finally:
            setattr(gc, field, {"repetition_penalty": 1.0, "suppress_tokens": [], "no_repeat_ngram_size": 0}[field])
    assert loop_unsupported(sharp_model) is None  # the no-op values configs often spell out are not in the way
    with pytest.raises(ConfigError, match="must be one of auto, loop, generate"):
        sample(sharp_model, tiny_tokenizer, prompt_ids, max_new_tokens=4, decoder="beam")


def test_decoder_from_the_environment(sharp_model, tiny_tokenizer, prompt_ids, monkeypatch):
    from finegrain import generation

    sharp_model.generation_config.repetition_penalty = 1.3
    try:
        monkeypatch.setenv("FINEGRAIN_DECODER", "loop")
        with pytest.raises(ConfigError, match="repetition_penalty"):
            sample(sharp_model, tiny_tokenizer, prompt_ids, max_new_tokens=4)
    finally:
        sharp_model.generation_config.repetition_penalty = 1.0
    # a model the loop can run, so `auto` would take the loop: the variable alone must send it to generate
    assert loop_unsupported(sharp_model) is None
    loops = []
    loop = generation._decode_loop
    monkeypatch.setattr(generation, "_decode_loop", lambda *a, **k: loops.append(1) or loop(*a, **k))
    monkeypatch.setenv("FINEGRAIN_DECODER", "auto")
    sample(sharp_model, tiny_tokenizer, prompt_ids, max_new_tokens=4, do_sample=False)
    assert len(loops) == 1  # the wrapper counts: auto ran the loop
    monkeypatch.setenv("FINEGRAIN_DECODER", "generate")
    sample(sharp_model, tiny_tokenizer, prompt_ids, max_new_tokens=4, do_sample=False)
    assert len(loops) == 1  # generate asked for: the loop was not run again
    monkeypatch.setenv("FINEGRAIN_DECODER", "fast")
    with pytest.raises(ConfigError, match="FINEGRAIN_DECODER"):
        sample(sharp_model, tiny_tokenizer, prompt_ids, max_new_tokens=4)


def test_typical_chat_generation_config_runs_the_loop(tiny_tokenizer):
    """Sampling defaults and spelled-out no-ops (as in Llama / Qwen configs) leave the loop in charge."""
    m = make_tiny_model(tiny_tokenizer, "causal", seed=0)
    gc = m.generation_config
    gc.update(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.0,
              eos_token_id=[tiny_tokenizer.eos_token_id, 3], num_beams=1, cache_implementation="static")
    assert loop_unsupported(m) is None
    gc.update(repetition_penalty=1.05)
    assert loop_unsupported(m) == "its generation_config sets repetition_penalty"
    gc.update(repetition_penalty=1.0, num_beams=4, max_time=3.0)
    assert loop_unsupported(m) == "its generation_config sets max_time, num_beams"


def test_repetition_penalty_changes_greedy_output(sharp_model, tiny_tokenizer, prompt_ids):
    """The fallback is not vacuous: with the penalty, generate's tokens differ from the loop's unpenalised ones."""
    plain = sample(sharp_model, tiny_tokenizer, prompt_ids, max_new_tokens=12, do_sample=False, decoder="loop")
    sharp_model.generation_config.repetition_penalty = 5.0
    try:
        penalised = sample(sharp_model, tiny_tokenizer, prompt_ids, max_new_tokens=12, do_sample=False)
    finally:
        sharp_model.generation_config.repetition_penalty = 1.0
    assert not torch.equal(plain.response_ids, penalised.response_ids)


def test_sampling_runs_outside_inference_mode(tiny_tokenizer, prompt_ids):
    """CPU/GPU autocast caches its low-precision weight copies only outside inference mode; decoding
    re-reads the weights every token, so `sample` runs under no_grad."""
    m = make_tiny_model(tiny_tokenizer, "causal", seed=0).eval()
    seen = []
    m.register_forward_hook(lambda *_: seen.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled())))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sample(m, tiny_tokenizer, prompt_ids, max_new_tokens=3, decoder="loop")
    assert seen and set(seen) == {(False, False)}


# ----------------------------------------------------------------------------- preallocated KV cache
def _tiny_llama(vocab: int, attn: str, kv_heads: int = 2, **cfg):
    """A 2-layer Llama with grouped-query attention (4 heads, ``kv_heads`` key/value heads), sharpened."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
                                      attn_implementation=attn, **cfg)
    m = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return m


def _loop(model, prompt_ids, pad, *, do_sample, preallocated, n=14):
    from finegrain import speed
    from finegrain.generation import _decode_loop
    from finegrain.tokens import left_pad

    ids, mask = left_pad(prompt_ids, pad)
    torch.manual_seed(3)
    with speed.overrides(preallocated_kv_cache=preallocated), torch.no_grad():
        return _decode_loop(model, ids, mask, max_new_tokens=n, eos=-1, pad=pad, min_new_tokens=0,
                            do_sample=do_sample, temperature=1.0, top_k=0, top_p=1.0)


@pytest.mark.parametrize("arch", ["gpt2-sdpa", "llama-gqa-eager", "llama-gqa-sdpa"])
@pytest.mark.parametrize("do_sample", [False, True])
def test_preallocated_cache_decodes_the_dynamic_caches_tokens(arch, do_sample, sharp_model, tiny_tokenizer,
                                                              prompt_ids, monkeypatch):
    from finegrain import generation

    model = sharp_model if arch == "gpt2-sdpa" else _tiny_llama(len(tiny_tokenizer), arch.rsplit("-", 1)[1])
    made = []
    real = generation.preallocated_cache
    monkeypatch.setattr(generation, "preallocated_cache", lambda m, c: made.append(real(m, c)) or made[-1])
    pad = tiny_tokenizer.pad_token_id
    on = _loop(model, prompt_ids, pad, do_sample=do_sample, preallocated=True)
    assert made and made[0] is not None and type(made[0].layers[0]).__name__ == "PreallocatedLayer"
    assert made[0].layers[0].filled == max(map(len, prompt_ids)) + on.shape[1] - 1  # the last token is not fed back
    off = _loop(model, prompt_ids, pad, do_sample=do_sample, preallocated=False)
    assert len(made) == 1  # off: no preallocated cache was asked for
    assert on.shape == (len(PROMPTS), 14) and torch.equal(on, off)
    assert len({tuple(r.tolist()) for r in on}) > 1  # not a degenerate model


def test_preallocated_cache_only_where_attention_reads_the_view_without_a_copy(sharp_model, tiny_tokenizer):
    import transformers

    from finegrain.generation import preallocated_cache
    from finegrain.models import RECOMPUTED_EAGER

    v = len(tiny_tokenizer)
    assert preallocated_cache(sharp_model, 8) is not None  # GPT-2, SDPA
    eager_gpt2 = make_tiny_model(tiny_tokenizer, "causal")
    eager_gpt2.config._attn_implementation = "eager"
    assert preallocated_cache(eager_gpt2, 8) is None  # eager attention would copy the view in every layer
    assert preallocated_cache(_tiny_llama(v, "eager"), 8) is not None  # grouped heads: repeat_kv copies anyway
    assert preallocated_cache(_tiny_llama(v, "eager", kv_heads=4), 8) is None  # no grouping: as GPT-2
    assert preallocated_cache(_tiny_llama(v, "sdpa", kv_heads=4), 8) is not None
    recomputed = _tiny_llama(v, "eager", kv_heads=4)
    recomputed.config._attn_implementation = RECOMPUTED_EAGER
    assert preallocated_cache(recomputed, 8) is None
    torch.manual_seed(0)
    sliding = transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=4, attn_implementation="sdpa"))
    assert preallocated_cache(sliding, 8) is None  # sliding-window layers keep their own cache


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=8), st.integers(1, 6), st.integers(0, 3),
       st.lists(st.integers(0, 2), min_size=1, max_size=4))
def test_preallocated_layer_holds_what_the_dynamic_layer_holds(sizes, capacity, crop, rows):
    from transformers.cache_utils import DynamicLayer

    from finegrain.generation import _preallocated_layer_class

    pre, dyn = _preallocated_layer_class()(capacity), DynamicLayer()
    g = torch.Generator().manual_seed(sum(sizes) + capacity)

    def same():
        assert pre.get_seq_length() == dyn.get_seq_length()
        assert torch.equal(pre.keys, dyn.keys) and torch.equal(pre.values, dyn.values)

    for m in sizes:  # past the capacity it grows; each update returns the whole filled cache
        k, v = torch.randn(3, 2, m, 4, generator=g), torch.randn(3, 2, m, 4, generator=g)
        (pk, pv), (dk, dv) = pre.update(k, v), dyn.update(k, v)
        assert torch.equal(pk, dk) and torch.equal(pv, dv)
        same()
    crop = min(crop, dyn.get_seq_length() - 1)
    if crop:
        pre.crop(-crop), dyn.crop(-crop)
        same()
    idx = torch.tensor(rows)
    pre.batch_select_indices(idx), dyn.batch_select_indices(idx)
    same()
    k, v = torch.randn(len(rows), 2, 2, 4, generator=g), torch.randn(len(rows), 2, 2, 4, generator=g)
    pre.update(k, v), dyn.update(k, v)
    same()
    with pytest.raises(ValueError, match="negative"):
        pre.crop(1)
    pre.reset()
    assert pre.get_seq_length() == 0 and not pre.is_initialized
