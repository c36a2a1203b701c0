"""The model zoo: tiny models of the families users bring, built from configs here (no download).

Decoders as policy, reference, value and reward model (Llama, Qwen2 with and without sliding
windows, Mistral, Gemma 2 and 3 with soft-capping and sliding layers, Phi-3 with and without
LongRoPE, GPT-NeoX, OPT, GPT-2) and encoders as reward models (BERT, RoBERTa, DeBERTa-v2), each
through finegrain's paths: the decoding loop against ``generate`` and a full forward on
left-padded prompts, the sampling speed switches that claim the same tokens, reward-model
training and scoring against plain transformers, and two PPO steps. A family transformers gives
no token-classification head (OPT, Gemma 3) is refused in one line that says what to use instead.
"""
from __future__ import annotations

import contextlib
import json

import pytest
import torch

from finegrain import speed
from finegrain.config import build_config
from finegrain.errors import ConfigError
from finegrain.generation import sample
from finegrain.models import load_model, save_checkpoint
from finegrain.ppo.rollout import join_query_response
from finegrain.scratch import train_bpe_tokenizer
from finegrain.tokens import encode_texts

PROMPTS = ["The capital of", "Step 1: preheat the oven and mix the flour", "Paris", "I am sorry, but I cannot help",
           "Question: how tall"]
DECODERS = ["llama", "qwen2", "qwen2-sliding", "mistral", "gemma2", "gemma3", "phi3", "gpt_neox", "opt", "gpt2"]
ENCODERS = ["bert", "roberta", "deberta-v2"]
NO_TOKEN_HEAD = {"gemma3", "opt"}  # transformers has no *ForTokenClassification for these


pytestmark = pytest.mark.usefixtures("single_thread")


def decoder_config(arch: str, vocab: int, eos: int, pad: int | None, **extra):
    """(config, causal LM class) of a 2-layer, 32-wide ``arch``; sliding windows of 4 where the family has them."""
    import transformers as T

    from finegrain.scratch import tiny_gpt2_config

    ids = dict(eos_token_id=eos, bos_token_id=eos, pad_token_id=pad)
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, **ids)
    sliding = dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)  # layer 1 only: a window of 4
    neox = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=128, rotary_pct=0.25, **ids)
    opt = dict(vocab_size=vocab, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
               word_embed_proj_dim=32, max_position_embeddings=128, dropout=0.0, attention_dropout=0.0, **ids)
    made = {
        "llama": lambda: (T.LlamaConfig(**common), T.LlamaForCausalLM),
        "qwen2": lambda: (T.Qwen2Config(**common), T.Qwen2ForCausalLM),
        "qwen2-sliding": lambda: (T.Qwen2Config(**common, **sliding), T.Qwen2ForCausalLM),
        "mistral": lambda: (T.MistralConfig(**common, sliding_window=4), T.MistralForCausalLM),
        "gemma2": lambda: (T.Gemma2Config(**common, head_dim=8, sliding_window=4, attn_logit_softcapping=50.0,
                                          final_logit_softcapping=30.0), T.Gemma2ForCausalLM),
        "gemma3": lambda: (T.Gemma3TextConfig(**common, head_dim=8, sliding_window=4), T.Gemma3ForCausalLM),
        "phi3": lambda: (T.Phi3Config(**common), T.Phi3ForCausalLM),
        "gpt_neox": lambda: (T.GPTNeoXConfig(**neox), T.GPTNeoXForCausalLM),
        "opt": lambda: (T.OPTConfig(**opt), T.OPTForCausalLM),
        "gpt2": lambda: (tiny_gpt2_config(vocab, eos_token_id=eos, pad_token_id=pad, n_positions=128),
                         T.GPT2LMHeadModel),
    }
    config, cls = made[arch]()
    for k, v in extra.items():
        setattr(config, k, v)
    return config, cls


def causal_lm(arch: str, tok, sharpen: float = 8.0, seed: int = 0, **extra):
    """A random ``arch`` LM for ``tok``; matrices scaled by ``sharpen`` so greedy decoding does not repeat one token."""
    config, cls = decoder_config(arch, len(tok), tok.eos_token_id, tok.pad_token_id, **extra)
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(sharpen)
    return model


@pytest.fixture(scope="module")
def zoo_tokenizer():
    from test_rm_train import NOUNS, corpus

    return train_bpe_tokenizer(corpus() + [f"Describe the {n}." for n in NOUNS] + PROMPTS * 5, vocab_size=300)


@pytest.fixture(scope="module")
def prompt_ids(zoo_tokenizer):
    ids = encode_texts(zoo_tokenizer, PROMPTS)
    assert max(map(len, ids)) > 4 + min(map(len, ids))  # left padding longer than the sliding windows
    return ids


def _loop_and_generate(model, tok, ids, n: int = 12):
    a = sample(model, tok, ids, max_new_tokens=n, do_sample=False, decoder="loop")
    b = sample(model, tok, ids, max_new_tokens=n, do_sample=False, decoder="generate")
    return a, b


def _full_forward_argmax(model, g) -> torch.Tensor:
    """(B, Lr) the argmax of one forward over prompt + response at each response position (no cache)."""
    ids, mask, pos = join_query_response(g.query_ids, g.query_mask, g.response_ids, torch.ones_like(g.response_mask))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    return logits[:, g.query_ids.shape[1] - 1:-1].argmax(-1)


# ----------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("arch", DECODERS)
def test_greedy_loop_is_generate_and_the_full_forward_on_left_padded_prompts(arch, zoo_tokenizer, prompt_ids):
    model = causal_lm(arch, zoo_tokenizer)
    loop, gen = _loop_and_generate(model, zoo_tokenizer, prompt_ids)
    assert torch.equal(loop.response_ids, gen.response_ids) and loop.texts == gen.texts
    assert len({tuple(r.tolist()) for r in loop.response_ids}) == len(PROMPTS)  # not a degenerate model
    # every cached step is what one forward over the left-padded rows predicts (masks and position ids)
    real = loop.response_mask.bool()
    assert torch.equal(_full_forward_argmax(model, loop)[real], loop.response_ids[real])
    with speed.overrides(preallocated_kv_cache=False):
        dynamic = sample(model, zoo_tokenizer, prompt_ids, max_new_tokens=12, do_sample=False, decoder="loop")
    assert torch.equal(dynamic.response_ids, loop.response_ids)


def _longrope_phi3(tok, original: int):
    """A Phi-3 with LongRoPE whose factors switch past ``original`` positions (Phi-3.5 / Phi-4-mini: 4,096)."""
    half = 32 // 4 // 2
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * half,
            "long_factor": [8.0 + i for i in range(half)]}
    return causal_lm("phi3", tok, original_max_position_embeddings=original, rope_parameters=rope)


def test_longrope_loop_runs_the_sequence_again_where_its_rope_switches_as_generate_does(zoo_tokenizer):
    """Past original_max_position_embeddings LongRoPE rotates every position with its long factors; the keys
    cached before were rotated with the short ones. generate runs the whole sequence again there (Phi-3's
    prepare_inputs_for_generation); the loop kept decoding on the stale cache and drew other tokens."""
    from finegrain.generation import longrope_switch_length

    switch = 10
    model = _longrope_phi3(zoo_tokenizer, switch)
    assert longrope_switch_length(model.config) == switch
    assert longrope_switch_length(causal_lm("phi3", zoo_tokenizer).config) is None
    ids = encode_texts(zoo_tokenizer, ["The capital of", "Paris is", "Paris"])
    assert max(map(len, ids)) < switch  # the prompts start below the switch, the responses cross it
    loop, gen = _loop_and_generate(model, zoo_tokenizer, ids)
    assert torch.equal(loop.response_ids, gen.response_ids)
    # response tokens predicted by a forward past the switch: what one forward over the whole sequence predicts
    after = slice(switch + 1 - loop.query_ids.shape[1], None)
    assert torch.equal(_full_forward_argmax(model, loop)[:, after], loop.response_ids[:, after])
    kw = dict(max_new_tokens=12, generator_seed=3, decoder="loop")
    drawn = sample(model, zoo_tokenizer, ids, **kw)
    with speed.overrides(preallocated_kv_cache=False):
        assert torch.equal(sample(model, zoo_tokenizer, ids, **kw).response_ids, drawn.response_ids)


def test_sampling_a_model_that_returns_no_cache_is_refused(zoo_tokenizer, prompt_ids):
    """GPT-2 in training mode with gradient checkpointing returns no KV cache: the loop would have fed each new
    token alone, without its context, and drawn garbage."""
    model = causal_lm("gpt2", zoo_tokenizer)
    model.gradient_checkpointing_enable()
    model.train()
    with pytest.raises(ConfigError, match=r"returned no KV cache .*model\.eval\(\)"):
        sample(model, zoo_tokenizer, prompt_ids, max_new_tokens=4, do_sample=False, decoder="loop")
    model.eval()
    assert sample(model, zoo_tokenizer, prompt_ids, max_new_tokens=4, do_sample=False).response_ids.shape[1] == 4


needs_onednn_bf16 = pytest.mark.skipif(not speed._onednn_bf16_linear(),
                                       reason="this CPU or torch build has no oneDNN bf16 linear kernels")


@needs_onednn_bf16
@pytest.mark.parametrize("arch", DECODERS)
@pytest.mark.parametrize("held", ["fp32 under bf16 autocast", "bf16"])
def test_bf16_sampling_switches_keep_the_tokens(arch, held, zoo_tokenizer, prompt_ids):
    """Packed oneDNN weights and the preallocated cache draw the tokens the plain weights and dynamic cache draw."""
    model = causal_lm(arch, zoo_tokenizer)
    if held == "bf16":
        model.to(torch.bfloat16)
    kw = dict(max_new_tokens=10, temperature=1.0, generator_seed=5, decoder="loop")
    with torch.autocast("cpu", dtype=torch.bfloat16) if held != "bf16" else contextlib.nullcontext():
        fast = sample(model, zoo_tokenizer, prompt_ids, **kw)
        with speed.overrides(packed_sampling_weights=False, preallocated_kv_cache=False):
            plain = sample(model, zoo_tokenizer, prompt_ids, **kw)
    assert torch.equal(fast.response_ids, plain.response_ids)


@pytest.mark.parametrize("arch,targets", [("llama", None), ("gemma2", None), ("phi3", ["qkv_proj"]),
                                          ("gpt_neox", None), ("opt", None)])
def test_merged_lora_sampling_draws_the_adapters_tokens(arch, targets, zoo_tokenizer, prompt_ids):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(causal_lm(arch, zoo_tokenizer),
                           LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # adapters that change the tokens
    assert speed._mergeable_lora_layers(model)
    kw = dict(max_new_tokens=10, temperature=1.0, generator_seed=5)
    merged = sample(model, zoo_tokenizer, prompt_ids, **kw)
    with speed.overrides(merge_lora_sampling=False):
        adapters = sample(model, zoo_tokenizer, prompt_ids, **kw)
    with model.disable_adapter():
        base = sample(model, zoo_tokenizer, prompt_ids, **kw)
    assert torch.equal(merged.response_ids, adapters.response_ids)
    assert not torch.equal(merged.response_ids, base.response_ids)


# ----------------------------------------------------------------------------- a family without a token head
@pytest.mark.parametrize("arch", sorted(NO_TOKEN_HEAD))
def test_a_family_without_a_token_head_is_one_config_error_that_says_what_to_use(arch, zoo_tokenizer, tmp_path):
    """transformers' own message listed every model type with a token head, over 100, and no way out; PPO loaded
    the policy before failing on the value model."""
    from finegrain.ppo.config import PPOConfig
    from finegrain.ppo.setup import preflight

    save_checkpoint(tmp_path / "policy", causal_lm(arch, zoo_tokenizer, sharpen=1), zoo_tokenizer, {})
    with pytest.raises(ConfigError) as err:
        load_model(str(tmp_path / "policy"), "token")
    msg = str(err.value)
    model_type = "gemma3_text" if arch == "gemma3" else arch
    assert f"no AutoModelForTokenClassification for model type {model_type!r}" in msg
    assert "--loss sequence" in msg and "--value-init shared" in msg and "\n" not in msg and len(msg) < 400
    assert type(load_model(str(tmp_path / "policy"), "sequence")).__name__.endswith("ForSequenceClassification")
    save_checkpoint(tmp_path / "rm", load_model(str(tmp_path / "policy"), "sequence"), zoo_tokenizer,
                    {"kind": "sequence"})
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "Describe the cat."}) + "\n")
    run = dict(policy=str(tmp_path / "policy"), reward_model=str(tmp_path / "rm"), prompts=str(tmp_path / "p.jsonl"),
               output=str(tmp_path / "out"), reward_mode="sequence", log_with="none")
    for value_init in ("policy", "reward"):
        with pytest.raises(ConfigError, match=rf"--value-init {value_init}: the value model is a token classifier "
                                              r".*--value-init shared"):
            preflight(build_config(PPOConfig, dict(run, value_init=value_init)))  # before any weights load
    preflight(build_config(PPOConfig, dict(run, value_init="shared")))


# ----------------------------------------------------------------------------- reward models and PPO
@pytest.fixture(scope="module")
def workspace(tmp_path_factory, zoo_tokenizer):
    from finegrain.io import write_jsonl
    from test_rm_train import synthetic_pairs

    root = tmp_path_factory.mktemp("zoo")
    write_jsonl(root / "train.jsonl", synthetic_pairs(16, seed=1))
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Describe the {n}."}) + "\n"
                                                for n in ["cat", "dog house", "river", "big old garden city"]))
    return root


def _policy(workspace, arch: str, tok) -> str:
    path = workspace / arch
    if not path.exists():
        save_checkpoint(path, causal_lm(arch, tok, sharpen=1.0), tok, {"kind": "causal"})
    return str(path)


def _fresh_precision() -> None:
    """accelerate fixes the precision once per process: reset it before each run (the fixture does around a test)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def _train_rm(workspace, base: str, name: str, loss: str) -> str:
    from finegrain.rm import TrainRMConfig, train_reward_model

    out = workspace / f"rm-{name}-{loss}"
    if not out.exists():
        _fresh_precision()
        train_reward_model(build_config(TrainRMConfig, dict(
            data=str(workspace / "train.jsonl"), model=base, output=str(out), loss=loss, eval_fraction=0.0, epochs=1,
            batch_size=8, lr=1e-3, max_length=48, eval_every=0, save_every=0, log_with="none")))
    return str(out)


def _scores_plain_transformers_agree(rm_dir: str) -> None:
    """A batch scored by finegrain (right-padded, bucketed) equals plain transformers on each unpadded input."""
    from finegrain.rm import RewardModel

    rm = RewardModel.load(rm_dir)
    prompts = ["Describe the cat.", "Describe the big old dog house near the river please.", "x"]
    responses = ["The cat is lovely.", "ugly", "The dog is awful and small today, come and see it near the old bridge"]
    ours = rm.score(prompts, responses, batch_size=3)
    plain = []
    with torch.no_grad():
        for ex in (rm.encode(p, r) for p, r in zip(prompts, responses)):
            logits = rm.model(input_ids=torch.tensor([ex.input_ids])).logits[0]
            plain.append(logits[0].item() if rm.kind == "sequence"
                         else logits[ex.response_start:ex.response_end, 0].mean().item())
    assert ours == pytest.approx(plain, abs=1e-5)


def _ppo(workspace, policy: str, rm: str, mode: str, name: str, **over) -> dict:
    from finegrain.ppo.config import PPOConfig
    from finegrain.ppo.train import train_ppo

    out = workspace / f"ppo-{name}"
    values = dict(policy=policy, reward_model=rm, prompts=str(workspace / "prompts.jsonl"), output=str(out),
                  reward_mode=mode, steps=2, batch_size=4, num_minibatches=2, ppo_epochs=1, max_new_tokens=5,
                  max_prompt_length=32, value_init="policy", save_every=100, sample_every=1, log_with="none", lr=1e-2)
    values.update(over)
    _fresh_precision()
    train_ppo(build_config(PPOConfig, values))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor([r["reward"], r["kl"], r["policy_loss"], r["value_loss"]])).all()
               for r in rows)
    # the saved policy (LoRA merged) moved away from the start
    before = load_model(policy, "causal").state_dict()
    after = load_model(str(out / "final"), "causal").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    return rows[-1]


# each family once in each reward mode, the options spread over them (LoRA, bf16 autocast, the shared value head)
PPO_RUNS = [
    ("llama", {}), ("qwen2", {"use_lora": True}), ("qwen2-sliding", {"mixed_precision": "bf16"}),
    ("mistral", {"use_lora": True, "mixed_precision": "bf16"}), ("gemma2", {"mixed_precision": "bf16"}),
    ("gemma3", {"value_init": "shared"}), ("phi3", {"use_lora": True, "lora_target_modules": ["qkv_proj"]}),
    ("gpt_neox", {"use_lora": True, "mixed_precision": "bf16"}), ("opt", {"value_init": "shared",
                                                                           "mixed_precision": "bf16"}),
    ("gpt2", {"value_init": "reward"}),
]


@pytest.mark.parametrize("arch,over", PPO_RUNS, ids=[a for a, _ in PPO_RUNS])
def test_decoder_reward_models_and_ppo(arch, over, workspace, zoo_tokenizer, fresh_accelerate_state):
    policy = _policy(workspace, arch, zoo_tokenizer)
    modes = ["sequence"] if arch in NO_TOKEN_HEAD else ["token", "sequence"]
    for mode in modes:
        rm = _train_rm(workspace, policy, arch, "token_edit" if mode == "token" else "sequence")
        _scores_plain_transformers_agree(rm)
        _ppo(workspace, policy, rm, mode, f"{arch}-{mode}", **over)


def encoder_tokenizer(kind: str, texts):
    """An encoder's pair layout: BERT (WordPiece, [CLS] a [SEP] b [SEP]), RoBERTa (byte-level BPE,
    <s> a </s></s> b </s>, trimmed offsets) or DeBERTa-v2 (Unigram, [CLS] / [SEP])."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "roberta":
        special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=special, show_progress=False,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tk.post_processor = processors.RobertaProcessing(("</s>", tk.token_to_id("</s>")),
                                                         ("<s>", tk.token_to_id("<s>")), trim_offsets=True)
        return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                       cls_token="<s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>")
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    if kind == "bert":
        tk = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tk.normalizer = normalizers.BertNormalizer(lowercase=True)
        tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tk.decoder = decoders.WordPiece()
        tk.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=300, special_tokens=special,
                                                                show_progress=False))
    else:
        tk = Tokenizer(models.Unigram())
        tk.pre_tokenizer = pre_tokenizers.Metaspace()
        tk.decoder = decoders.Metaspace()
        tk.train_from_iterator(texts, trainers.UnigramTrainer(vocab_size=300, special_tokens=special, unk_token="[UNK]",
                                                              show_progress=False))
    cls, sep = tk.token_to_id("[CLS]"), tk.token_to_id("[SEP]")
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                      special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
                                   unk_token="[UNK]", mask_token="[MASK]")


@pytest.mark.parametrize("arch", ENCODERS)
def test_encoder_reward_models_score_and_drive_cross_tokenizer_ppo(arch, workspace, zoo_tokenizer,
                                                                   fresh_accelerate_state):
    """Trained from a saved encoder with its own pair layout; PPO re-tokenises each response for it."""
    import transformers as T

    from finegrain.rm import RewardModel
    from finegrain.tokens import is_encoder_style
    from test_rm_train import NOUNS, corpus

    tok = encoder_tokenizer(arch, corpus() + [f"Describe the {n}." for n in NOUNS])
    assert is_encoder_style(tok)
    config = {"bert": T.BertConfig, "roberta": T.RobertaConfig, "deberta-v2": T.DebertaV2Config}[arch](
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, pad_token_id=tok.pad_token_id, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    save_checkpoint(workspace / f"enc-{arch}", T.AutoModel.from_config(config), tok, {})
    policy = _policy(workspace, "llama", zoo_tokenizer)
    for mode, loss in (("token", "token_edit"), ("sequence", "sequence")):
        rm = _train_rm(workspace, str(workspace / f"enc-{arch}"), arch, loss)
        _scores_plain_transformers_agree(rm)
        _ppo(workspace, policy, rm, mode, f"{arch}-{mode}", cross_tokenizer=True)
        samples = [json.loads(x) for x in (workspace / f"ppo-{arch}-{mode}" / "samples.jsonl").read_text().splitlines()]
        scored = RewardModel.load(rm).score([s["prompt"] for s in samples], [s["response"] for s in samples])
        assert [s["score"] for s in samples] == pytest.approx(scored, abs=1e-5)  # the RM's score of each text
