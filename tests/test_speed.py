"""The speed switches (`finegrain.speed`): one per speed path, read through one interface, and each
path switched off gives the same result as switched on."""
from __future__ import annotations

import contextlib

import pytest
import torch
import transformers

from conftest import make_tiny_model
from finegrain import speed
from finegrain.errors import ConfigError
from finegrain.models import load_model, save_checkpoint


def test_defaults_are_every_fast_path_and_overrides_nest_and_restore(monkeypatch):
    monkeypatch.delenv("FINEGRAIN_DECODER", raising=False)
    monkeypatch.delenv("FINEGRAIN_MALLOC_TUNING", raising=False)
    default = speed.options()
    assert default == speed.SpeedOptions()
    assert all(v is True for k, v in vars(default).items() if k != "decoder") and default.decoder == "auto"
    with speed.overrides(fuse_gelu=False, decoder="generate") as outer:
        assert outer == speed.options() and not outer.fuse_gelu and outer.decoder == "generate"
        with speed.overrides(decoder="loop", reuse_rollout_forward=False):
            now = speed.options()
            assert (now.fuse_gelu, now.decoder, now.reuse_rollout_forward) == (False, "loop", False)
        assert speed.options() == outer
    assert speed.options() == default
    with pytest.raises(RuntimeError), speed.overrides(trim_minibatches=False):
        raise RuntimeError  # an exception inside the block restores the switches too
    assert speed.options() == default


def test_environment_variables_are_read_at_each_call_and_overrides_win(monkeypatch):
    monkeypatch.setenv("FINEGRAIN_DECODER", "generate")
    monkeypatch.setenv("FINEGRAIN_MALLOC_TUNING", "0")
    assert speed.options().decoder == "generate" and not speed.options().keep_freed_memory
    with speed.overrides(decoder="loop", keep_freed_memory=True):
        assert speed.options().decoder == "loop" and speed.options().keep_freed_memory
    monkeypatch.setenv("FINEGRAIN_DECODER", "")
    monkeypatch.setenv("FINEGRAIN_MALLOC_TUNING", "1")
    assert speed.options().decoder == "auto" and speed.options().keep_freed_memory
    monkeypatch.setenv("FINEGRAIN_DECODER", "fast")  # refused where it is used, naming the variable
    with pytest.raises(ConfigError, match="FINEGRAIN_DECODER"):
        speed.decoder()
    assert speed.decoder("generate") == "generate"  # an explicit choice wins


def test_configure_sets_switches_for_the_process(monkeypatch):
    monkeypatch.setattr(speed, "_configured", {})
    assert not speed.configure(logits_to_keep=False).logits_to_keep
    assert not speed.options().logits_to_keep
    with speed.overrides(logits_to_keep=True):
        assert speed.options().logits_to_keep
    assert not speed.options().logits_to_keep


@pytest.mark.parametrize("changes,match", [({"fuse_gelus": False}, "no speed switch 'fuse_gelus'"),
                                           ({"decoder": "beam"}, "must be one of auto, loop, generate"),
                                           ({"fuse_gelu": "no"}, "True or False")])
def test_unknown_switches_and_bad_values_are_refused(changes, match):
    before = speed.options()
    with pytest.raises(ConfigError, match=match):
        with speed.overrides(**changes):
            pass
    with pytest.raises(ConfigError, match=match):
        speed.configure(**changes)
    assert speed.options() == before  # nothing was half-applied


def _gelu_new_checkpoint(tokenizer, path):
    model = make_tiny_model(tokenizer)
    model.config.activation_function = "gelu_new"
    reference = transformers.GPT2LMHeadModel(model.config)
    reference.load_state_dict(model.state_dict())
    save_checkpoint(path, reference, tokenizer)
    return reference.eval()


def _gelu_kinds(model) -> set[str]:
    """"gelu_new" for transformers' 8-op module, "fused" for the one-kernel tanh GELU."""
    from transformers import activations

    fused = activations.ACT2CLS["gelu_pytorch_tanh"]
    fused = fused[0] if isinstance(fused, tuple) else fused
    kinds = {activations.NewGELUActivation: "gelu_new", fused: "fused"}
    return {kinds[type(m)] for m in model.modules() if type(m) in kinds}


def test_fuse_gelu_switch_at_load_and_on_a_live_model(tiny_tokenizer, tmp_path):
    reference = _gelu_new_checkpoint(tiny_tokenizer, tmp_path / "m")
    with speed.overrides(fuse_gelu=False):
        plain = load_model(str(tmp_path / "m"), "causal").eval()
    assert _gelu_kinds(plain) == {"gelu_new"}
    fused = load_model(str(tmp_path / "m"), "causal").eval()
    assert _gelu_kinds(fused) == {"fused"}
    ids = torch.tensor([tiny_tokenizer("Paris is a large city.")["input_ids"]])
    with torch.no_grad():
        want = reference(ids).logits
        assert torch.allclose(plain(ids).logits, want, atol=1e-5)
        # a live model follows the switch when asked: unfused inside the block, fused again after it
        with speed.overrides(fuse_gelu=False):
            assert speed.apply_model_switches(fused) == 2 and _gelu_kinds(fused) == {"gelu_new"}
            assert torch.allclose(fused(ids).logits, want, atol=1e-6)
        assert speed.apply_model_switches(fused) == 2 and _gelu_kinds(fused) == {"fused"}
        assert torch.allclose(fused(ids).logits, want, atol=1e-5)
    assert speed.apply_model_switches(fused) == 0  # nothing left to do


def test_the_switch_off_runs_a_models_own_tanh_gelu_as_the_8_ops_too(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer).eval()  # tiny_gpt2_config: gelu_pytorch_tanh by config
    assert _gelu_kinds(model) == {"fused"} and speed.contiguous_head_input(model) == 1  # as a load leaves it
    ids = torch.tensor([tiny_tokenizer("Paris is a large city.")["input_ids"]])
    with torch.no_grad():
        want = model(ids).logits
        with speed.overrides(fuse_gelu=False):
            assert speed.apply_model_switches(model) == 2 and _gelu_kinds(model) == {"gelu_new"}
            assert torch.allclose(model(ids).logits, want, atol=1e-5)
        assert speed.apply_model_switches(model) == 2 and _gelu_kinds(model) == {"fused"}
    assert model.config.activation_function == "gelu_pytorch_tanh"


def test_logits_to_keep_switch_gives_the_same_log_probs(tiny_tokenizer):
    from finegrain.ppo.rollout import causal_logits

    model = make_tiny_model(tiny_tokenizer).eval()
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append("logits_to_keep" in kwargs),
                                    with_kwargs=True)
    ids = torch.randint(0, len(tiny_tokenizer), (2, 7))
    mask = torch.ones_like(ids)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        kept = causal_logits(model, ids, mask, pos, 3)
        with speed.overrides(logits_to_keep=False):
            assert not speed.keeps_logits(model)
            full = causal_logits(model, ids, mask, pos, 3)
    assert seen == [True, False] and speed.keeps_logits(model)
    assert full.shape == kept.shape == (2, 3, len(tiny_tokenizer)) and torch.allclose(full, kept, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_contiguous_head_input_hands_the_head_one_block_with_the_same_logits(tiny_tokenizer, dtype):
    model = make_tiny_model(tiny_tokenizer).eval().to(dtype)
    assert speed.apply_model_switches(model) == 1  # the hook, once; the GELU was the model's own fused one
    assert speed.apply_model_switches(model) == 0
    seen: list[bool] = []
    # registered after finegrain's hook, so it sees what the head multiplies
    model.get_output_embeddings().register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    ids = torch.randint(0, len(tiny_tokenizer), (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        on = model(ids, logits_to_keep=4).logits
        with speed.overrides(contiguous_head_input=False):
            assert speed.apply_model_switches(model) == 1
            off = model(ids, logits_to_keep=4).logits
        whole = model(ids).logits  # the switch stays off until the model is brought in line again
        assert speed.apply_model_switches(model) == 1
    # transformers slices hidden[:, -4:] (strided); with the hook the head gets it copied into one block
    assert seen == [True, False, True]
    assert on.shape == (3, 4, model.config.vocab_size) and on.dtype == dtype
    torch.testing.assert_close(on, off)
    torch.testing.assert_close(on, whole[:, -4:])
    classifier = make_tiny_model(tiny_tokenizer, head="sequence")
    assert speed.contiguous_head_input(classifier) == 0  # no output embeddings: nothing to hook


def test_sampling_grad_mode_switch(tiny_tokenizer):
    from finegrain.generation import sample
    from finegrain.tokens import encode_texts

    model = make_tiny_model(tiny_tokenizer).eval()
    ids = encode_texts(tiny_tokenizer, ["The capital of", "Paris"])
    runs = {}
    for on in (True, False):
        with speed.overrides(no_grad_sampling=on):
            runs[on] = sample(model, tiny_tokenizer, ids, max_new_tokens=5, do_sample=False)
    assert not runs[True].response_ids.is_inference() and runs[False].response_ids.is_inference()
    assert torch.equal(runs[True].response_ids, runs[False].response_ids)


def test_decoder_switch_reaches_sample(tiny_tokenizer, monkeypatch):
    from finegrain import generation

    model = make_tiny_model(tiny_tokenizer).eval()
    ids = generation.encode_prompts(tiny_tokenizer, ["The capital of", "Paris"])
    loops = []
    loop = generation._decode_loop
    monkeypatch.setattr(generation, "_decode_loop", lambda *a, **k: loops.append(1) or loop(*a, **k))
    a = generation.sample(model, tiny_tokenizer, ids, max_new_tokens=5, do_sample=False)
    with speed.overrides(decoder="generate"):
        b = generation.sample(model, tiny_tokenizer, ids, max_new_tokens=5, do_sample=False)
    assert len(loops) == 1 and torch.equal(a.response_ids, b.response_ids)


def test_fused_adamw_switch():
    from finegrain.training import make_adamw

    params = [torch.nn.Parameter(torch.randn(3, 3))]
    fused = make_adamw(params, lr=1e-3)
    with speed.overrides(fused_adamw=False):
        plain = make_adamw(params, lr=1e-3)
    assert not plain.defaults.get("fused")
    try:
        torch.optim.AdamW(params, fused=True)
    except (RuntimeError, ValueError, TypeError):
        pytest.skip("this torch has no fused AdamW for CPU tensors")
    assert fused.defaults["fused"]


def test_trim_switch_reaches_the_update(monkeypatch):
    from accelerate import Accelerator

    from finegrain.config import build_config
    from finegrain.ppo.config import PPOConfig
    from finegrain.ppo.rollout import Rollout
    from finegrain.ppo.train import ppo_update
    from test_ppo_rewards import _synthetic_rollout

    r = _synthetic_rollout([2, 3, 1, 3], [2, 1, 3, 2], 3, 3)
    cfg = build_config(PPOConfig, dict(policy="p", reward_model="r", reward_mode="sequence", prompts="x", output="o",
                                       batch_size=4, num_minibatches=2, ppo_epochs=1))
    trims = []
    select = Rollout.select
    monkeypatch.setattr(Rollout, "select", lambda self, idx, device, trim=True: trims.append(trim)
                        or select(self, idx, device, trim))
    monkeypatch.setattr("finegrain.ppo.train.ppo_minibatch_loss",
                        lambda model, b, cfg, attached=None: ((model.weight * 0).sum(), {"loss": 0.0}))
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accelerator(cpu=True)
    ppo_update(acc, model, opt, r, cfg, 0)
    with speed.overrides(trim_minibatches=False):
        ppo_update(acc, model, opt, r, cfg, 0)
    assert trims == [True, True, False, False]


def _lora_model(tiny_tokenizer, make: str, dropout: float = 0.0):
    """A tiny GPT-2 (Conv1D layers) or Llama (nn.Linear) with LoRA adapters whose B is not zero."""
    from peft import LoraConfig, get_peft_model

    from test_fast_kernels import _tiny_llama

    base = make_tiny_model(tiny_tokenizer).eval() if make == "gpt2" else _tiny_llama()
    targets = ["c_attn"] if make == "gpt2" else ["q_proj", "v_proj"]
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets,
                                            task_type="CAUSAL_LM")).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # peft starts B at zero, where merged and unmerged agree trivially
    return model


def _lora_calls(model) -> list[int]:
    calls = [0]
    for name, m in model.named_modules():
        if name.endswith("lora_A.default"):
            m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("make", ["gpt2", "llama"])
def test_merged_lora_runs_plain_layers_with_the_same_logits_and_restores_everything(tiny_tokenizer, make):
    from peft.tuners.lora import Linear as LoraLinear

    model = _lora_model(tiny_tokenizer, make)
    ids = torch.randint(3, 300, (3, 9))
    before = {k: v for k, v in model.state_dict().items()}
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    calls = _lora_calls(model)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        assert calls[0] > 0
        calls[0] = 0
        with speed.merged_lora(model) as n:
            assert n == len(layers) == (2 if make == "gpt2" else 4)  # every adapted layer of both blocks
            assert not any(isinstance(m, LoraLinear) for m in model.modules())
            got = model(input_ids=ids).logits
        assert calls[0] == 0  # no adapter matmul ran inside the block
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - plain).abs().max() > 1e-2  # the merged update is really there
    assert {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)} == layers  # the same objects
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] or after[k].data_ptr() == before[k].data_ptr() for k in before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_merged_lora_under_bf16_autocast_stores_the_merged_weights_in_bf16_and_restores_on_error(tiny_tokenizer):
    model = _lora_model(tiny_tokenizer, "llama")
    ids = torch.randint(3, 300, (2, 7))
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(input_ids=ids).logits.float()
        with speed.merged_lora(model):
            merged = model.base_model.model.model.layers[0].self_attn.q_proj
            assert merged.weight.dtype == torch.bfloat16 and not merged.weight.requires_grad
            expect = (q.base_layer.weight + q.get_delta_weight("default")).to(torch.bfloat16)
            assert torch.equal(merged.weight, expect)
            got = model(input_ids=ids).logits.float()
    assert q.base_layer.weight.dtype == torch.float32  # the base layer itself is untouched
    # bf16 rounding of one merged weight against two bf16 products: close, not equal
    assert (got - want).abs().max() < 0.1 * want.abs().max()
    with pytest.raises(RuntimeError), speed.merged_lora(model):
        raise RuntimeError
    assert model.base_model.model.model.layers[0].self_attn.q_proj is q


def test_merged_lora_leaves_what_it_cannot_merge_alone(tiny_tokenizer):
    model = _lora_model(tiny_tokenizer, "gpt2", dropout=0.1)
    with speed.merged_lora(model) as n:
        assert n == 2  # eval mode: the dropout does nothing, so both layers qualify ...
    model.train()
    with speed.merged_lora(model) as n:
        assert n == 0  # ... but in training mode a dropout of 0.1 acts: not W + s B A
    model.eval()
    with speed.overrides(merge_lora_sampling=False), speed.merged_lora(model) as n:
        assert n == 0
    with model.disable_adapter(), speed.merged_lora(model) as n:
        assert n == 0
    with speed.merged_lora(model) as n:
        assert n == 2
    plain = make_tiny_model(tiny_tokenizer)
    with speed.merged_lora(plain) as n:
        assert n == 0


def test_sample_draws_the_same_tokens_through_merged_lora_weights(tiny_tokenizer):
    from finegrain.generation import sample

    model = _lora_model(tiny_tokenizer, "gpt2")
    calls = _lora_calls(model)
    prompts = [tiny_tokenizer.encode("the cat sat"), tiny_tokenizer.encode("a dog ran far")]
    kw = dict(max_new_tokens=12, temperature=1.0, generator_seed=5)
    merged = sample(model, tiny_tokenizer, prompts, **kw)
    assert calls[0] == 0
    with speed.overrides(merge_lora_sampling=False):
        unmerged = sample(model, tiny_tokenizer, prompts, **kw)
    assert calls[0] > 0
    assert torch.equal(merged.response_ids, unmerged.response_ids) and merged.texts == unmerged.texts


# ----------------------------------------------------------------------------- packed sampling weights
needs_onednn_bf16 = pytest.mark.skipif(not speed._onednn_bf16_linear(),
                                       reason="this CPU or torch build has no oneDNN bf16 linear kernels")


def _plain_model(tiny_tokenizer, make: str):
    from test_fast_kernels import _tiny_llama

    return make_tiny_model(tiny_tokenizer).eval() if make == "gpt2" else _tiny_llama()


def _linear_layers(model) -> list:
    from transformers.pytorch_utils import Conv1D

    return [m for m in model.modules() if type(m) in (torch.nn.Linear, Conv1D)]


@needs_onednn_bf16
@pytest.mark.parametrize("make", ["gpt2", "llama"])
@pytest.mark.parametrize("held", ["fp32 under bf16 autocast", "bf16"])
def test_packed_weights_multiply_bit_for_bit_as_the_plain_ones_and_restore(tiny_tokenizer, make, held):
    model = _plain_model(tiny_tokenizer, make)
    if held == "bf16":
        model.to(torch.bfloat16)
    layers = _linear_layers(model)
    weights = {id(m): m.weight for m in layers}
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if held != "bf16" else contextlib.nullcontext()
    with torch.no_grad(), cast:
        for rows, width in ((3, 9), (3, 1), (1, 4)):  # a prompt's forward and decoding-sized ones
            ids = torch.randint(3, 300, (rows, width))
            want = model(input_ids=ids).logits
            with speed.packed_linear_weights(model, rows=3) as n:
                assert n == len(layers) > 0  # every linear layer, the (tied) LM head among them
                assert all("forward" in vars(m) for m in layers)
                got = model(input_ids=ids).logits
            assert got.dtype == want.dtype and torch.equal(got, want)
    assert not any("forward" in vars(m) for m in layers)  # each layer's own forward is back
    assert all(m.weight is weights[id(m)] for m in layers)  # the weights themselves were never touched
    with pytest.raises(RuntimeError), speed.packed_linear_weights(model, rows=3):
        raise RuntimeError
    assert not any("forward" in vars(m) for m in layers)


@needs_onednn_bf16
def test_packed_weights_are_only_for_bf16_products(tiny_tokenizer):
    model = _plain_model(tiny_tokenizer, "llama")
    with speed.packed_linear_weights(model, rows=2) as n:
        assert n == 0  # fp32 weights without autocast multiply in fp32
    with torch.autocast("cpu", dtype=torch.float16), speed.packed_linear_weights(model, rows=2) as n:
        assert n == 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with speed.overrides(packed_sampling_weights=False), speed.packed_linear_weights(model, rows=2) as n:
            assert n == 0
        with speed.packed_linear_weights(model, rows=2) as n:
            assert n == len(_linear_layers(model))
    model.model.layers[0].mlp.to(torch.bfloat16)  # without autocast only the bf16 layers multiply in bf16
    with speed.packed_linear_weights(model, rows=2) as n:
        assert n == 3  # gate, up and down of that block
    mlp_bytes = 2 * sum(p.numel() for p in model.model.layers[0].mlp.parameters())
    with pytest.MonkeyPatch.context() as mp:  # copies that would not fit in the memory free: none
        mp.setattr(speed, "_packing_budget", lambda: mlp_bytes - 1)
        with speed.packed_linear_weights(model, rows=2) as n:
            assert n == 0
        mp.setattr(speed, "_packing_budget", lambda: mlp_bytes)
        with speed.packed_linear_weights(model, rows=2) as n:
            assert n == 3
    assert 0 < speed._packing_budget()


@needs_onednn_bf16
@pytest.mark.parametrize("make", ["gpt2", "llama"])
def test_sample_draws_the_same_tokens_through_packed_weights(tiny_tokenizer, make):
    from finegrain.generation import sample

    model = _plain_model(tiny_tokenizer, make)
    prompts = [[41, 7, 250], [12, 99, 3, 180], [5, 6]]  # ids both vocabularies have (the Llama's is 300)
    packed = []
    real = speed.packed_linear_weights

    @contextlib.contextmanager
    def spy(m, rows):
        with real(m, rows) as n:
            packed.append((n, rows))
            yield n

    kw = dict(max_new_tokens=12, temperature=1.0, generator_seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.MonkeyPatch.context() as mp:
        mp.setattr(speed, "packed_linear_weights", spy)
        fast = sample(model, tiny_tokenizer, prompts, **kw)
        with speed.overrides(packed_sampling_weights=False):
            plain = sample(model, tiny_tokenizer, prompts, **kw)
    assert packed == [(len(_linear_layers(model)), 3), (0, 3)]
    assert torch.equal(fast.response_ids, plain.response_ids) and fast.texts == plain.texts


# ----------------------------------------------------------------------------- SDPA sampling
def _tiny_gemma2():
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                    max_position_embeddings=64)
    assert cfg.attn_logit_softcapping is not None  # Gemma 2 soft-caps its attention logits, which SDPA refuses
    return transformers.Gemma2ForCausalLM(cfg).eval()


@pytest.mark.parametrize("make", ["gpt2", "llama"])
def test_sdpa_sampling_switches_only_a_marked_model_and_restores_its_attention(tiny_tokenizer, make):
    from finegrain.models import RECOMPUTED_EAGER, register_attention

    register_attention()
    for own in ("eager", RECOMPUTED_EAGER):
        model = _plain_model(tiny_tokenizer, make)
        model.set_attn_implementation(own)
        with speed.sdpa_sampling(model) as switched:  # not marked: what the user asked for stays
            assert not switched and model.config._attn_implementation == own
        assert speed.allow_sdpa_sampling(model)
        layers = [m.config for m in model.modules() if hasattr(m, "config") and m is not model]
        with speed.sdpa_sampling(model) as switched:
            assert switched and model.config._attn_implementation == "sdpa"
            assert layers and all(c._attn_implementation == "sdpa" for c in layers)
        assert model.config._attn_implementation == own and all(c._attn_implementation == own for c in layers)
        with pytest.raises(RuntimeError), speed.sdpa_sampling(model):
            raise RuntimeError
        assert model.config._attn_implementation == own
        with speed.overrides(sdpa_sampling=False), speed.sdpa_sampling(model) as switched:
            assert not switched and model.config._attn_implementation == own
    sdpa = _plain_model(tiny_tokenizer, make)
    sdpa.set_attn_implementation("sdpa")
    assert not speed.allow_sdpa_sampling(sdpa)  # nothing to switch


def test_sdpa_sampling_leaves_soft_capped_attention_and_peft_models_reach_their_base():
    from peft import LoraConfig, get_peft_model

    from test_fast_kernels import _tiny_llama

    gemma = _tiny_gemma2()
    gemma.set_attn_implementation("eager")
    assert not speed.allow_sdpa_sampling(gemma)
    with speed.sdpa_sampling(gemma) as switched:
        assert not switched and gemma.config._attn_implementation == "eager"
    base = _tiny_llama()
    base.set_attn_implementation("eager")
    lora = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    assert speed.allow_sdpa_sampling(lora) and getattr(base, speed.SDPA_SAMPLING)
    with speed.sdpa_sampling(lora) as switched:
        assert switched and base.config._attn_implementation == "sdpa"
    assert base.config._attn_implementation == "eager"


@pytest.mark.parametrize("make", ["gpt2", "llama"])
def test_sample_attends_through_sdpa_when_allowed_with_the_same_tokens_in_fp32(tiny_tokenizer, make):
    from finegrain.generation import sample

    model = _plain_model(tiny_tokenizer, make)
    model.set_attn_implementation("eager")
    prompts = [[41, 7, 250], [12, 99, 3, 180], [5, 6]]  # left-padded to different lengths: a real mask
    kw = dict(max_new_tokens=12, temperature=1.0, generator_seed=5)
    real = torch.nn.functional.scaled_dot_product_attention
    calls = [0]

    def spy(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        plain = sample(model, tiny_tokenizer, prompts, **kw)
        assert calls[0] == 0  # eager, as loaded
        speed.allow_sdpa_sampling(model)
        fast = sample(model, tiny_tokenizer, prompts, **kw)
        layers = model.config.num_hidden_layers
        assert calls[0] >= layers * fast.response_ids.shape[1]  # every layer of the prefill and of each step
        assert model.config._attn_implementation == "eager"  # the training forwards keep their kernel
        calls[0] = 0
        with speed.overrides(sdpa_sampling=False):
            off = sample(model, tiny_tokenizer, prompts, **kw)
        assert calls[0] == 0
    # fp32: the two kernels agree to ~1e-7, so the same draws (in bf16 they round apart: other draws)
    assert torch.equal(fast.response_ids, plain.response_ids) and fast.texts == plain.texts
    assert torch.equal(off.response_ids, plain.response_ids)
