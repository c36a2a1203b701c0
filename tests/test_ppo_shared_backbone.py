"""PPO with a shared policy/value backbone (``--value-init shared``): the values are a zero-initialised
head on the policy's last hidden state, one forward serves both, the value loss reaches the
backbone, and a run trains, saves its head, reuses the rollout's forward and resumes exactly.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from test_ppo_train import make_workspace, tiny, toy_config, word_tokenizer


def _batch():
    ids = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 10, 11, 3]])
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def test_values_are_the_heads_product_on_the_final_normed_hidden_state_in_the_policys_own_forward():
    from finegrain.ppo.rollout import PolicyAndValue, ValueHead

    tok = word_tokenizer()
    policy = tiny(tok, "causal", 1)
    head = ValueHead(policy.config.hidden_size)
    with torch.no_grad():
        head.linear.weight.copy_(torch.linspace(-1, 1, policy.config.hidden_size)[None])
        head.linear.bias.fill_(0.25)
    model = PolicyAndValue(policy, None, head)
    ids, mask, pos = _batch()
    calls = []
    hook = policy.register_forward_hook(lambda *a: calls.append(1))
    logits, values = model(ids, mask, pos, logits_to_keep=3)
    hook.remove()
    assert calls == [1]  # one forward of the policy gives both
    with torch.no_grad():
        h = policy.transformer(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state  # after ln_f
        expected = h @ torch.linspace(-1, 1, policy.config.hidden_size) + 0.25
        full = policy(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert values.shape == (2, 5)
    torch.testing.assert_close(values.detach(), expected)
    torch.testing.assert_close(logits.detach(), full[:, -3:])


def test_a_fresh_head_predicts_zero_and_sends_no_gradient_into_the_backbone_until_it_has_learnt():
    from finegrain.ppo.rollout import PolicyAndValue, ValueHead

    tok = word_tokenizer()
    policy = tiny(tok, "causal", 1)
    model = PolicyAndValue(policy, None, ValueHead(policy.config.hidden_size))
    ids, mask, pos = _batch()
    _, values = model(ids, mask, pos)
    assert torch.equal(values, torch.zeros(2, 5))
    values.sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in policy.parameters())
    assert model.value_head.linear.weight.grad.abs().sum() > 0
    # once the head is not zero, the value loss trains the shared backbone: the change of the algorithm
    model.zero_grad()
    with torch.no_grad():
        model.value_head.linear.weight.fill_(0.1)
    _, values = model(ids, mask, pos)
    values.sum().backward()
    assert policy.transformer.h[0].mlp.c_fc.weight.grad.abs().sum() > 0


def test_policy_and_value_takes_a_value_model_or_a_head():
    from finegrain.ppo.rollout import PolicyAndValue, ValueHead

    tok = word_tokenizer()
    policy = tiny(tok, "causal", 1)
    with pytest.raises(ValueError, match="not both"):
        PolicyAndValue(policy, tiny(tok, "token", 2), ValueHead(32))
    with pytest.raises(ValueError, match="not both"):
        PolicyAndValue(policy, None)


@pytest.mark.parametrize("use_lora", [False, True])
def test_a_shared_backbone_run_loads_no_value_model_trains_and_saves_its_head(tmp_path, use_lora):
    from transformers import AutoModelForCausalLM

    from finegrain.models import read_meta
    from finegrain.ppo import load_value_head
    from finegrain.ppo.setup import load_models, preflight
    from finegrain.ppo.train import train_ppo

    ws = make_workspace(tmp_path)
    over = dict(use_lora=True, lora_r=4, lora_alpha=8, lora_target_modules=["c_attn"], lr=1e-2) if use_lora else {}
    cfg = toy_config(ws, tmp_path / "out", steps=2, value_init="shared", **over)
    models = load_models(cfg, preflight(cfg))
    assert models.value_model is None
    train_ppo(cfg, models=models)
    out = tmp_path / "out"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["value_mean"] == 0.0  # the zero head's values before the first update
    assert rows[1]["value_mean"] != 0.0 and all(r["value_loss"] > 0 for r in rows)
    if use_lora:
        assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # adapters start at zero: policy == reference
    head = load_value_head(out / "value")
    assert head.linear.weight.abs().sum() > 0  # the head learnt
    assert read_meta(out / "value")["kind"] == "value_head" and read_meta(out / "value")["backbone"] == "final"
    assert sorted(p.name for p in (out / "value").iterdir()) == ["finegrain.json", "value_head.safetensors"]
    before = AutoModelForCausalLM.from_pretrained(ws["policy"]).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # the saved head reads the saved policy's last hidden state (plain transformers, no finegrain model class)
    policy = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    ids, mask, pos = _batch()
    with torch.no_grad():
        h = policy(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True).hidden_states[-1]
        values = head(h)
    assert values.shape == (2, 5) and values.isfinite().all() and values.abs().sum() > 0


def test_the_first_epoch_through_the_rollouts_forward_is_the_same_shared_run(tmp_path):
    from transformers import AutoModelForCausalLM

    from finegrain import speed
    from finegrain.ppo.train import train_ppo

    ws = make_workspace(tmp_path)
    over = dict(steps=2, num_minibatches=1, ppo_epochs=2, save_every=10, sample_every=10, value_init="shared")
    runs = {}
    for reuse in (True, False):
        out = tmp_path / f"out-{reuse}"
        with speed.overrides(reuse_rollout_forward=reuse):
            train_ppo(toy_config(ws, out, **over))
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        runs[reuse] = (rows, AutoModelForCausalLM.from_pretrained(out / "final").state_dict())
    for a, b in zip(runs[True][0], runs[False][0]):
        for key in ("reward", "kl", "value_mean", "policy_loss", "value_loss", "approx_kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    w_reuse, w_plain = runs[True][1], runs[False][1]
    assert max((w_reuse[k] - w_plain[k]).abs().max().item() for k in w_reuse) < 1e-5


def test_a_shared_backbone_run_resumes_with_its_head(tmp_path):
    """The head's weights and its optimizer state live in the checkpoint: resumed from step 1, steps 2
    and 3 are the uninterrupted run's."""
    from finegrain.ppo.train import train_ppo

    ws = make_workspace(tmp_path)
    kw = dict(steps=3, batch_size=4, save_every=1, keep_checkpoints=3, value_init="shared")
    full = tmp_path / "full"
    train_ppo(toy_config(ws, full, **kw))
    ckpt = full / "checkpoints" / "step-00000001"
    crashed = tmp_path / "crashed"
    shutil.copytree(ckpt, crashed / "checkpoints" / ckpt.name)
    ref = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    (crashed / "metrics.jsonl").write_text(json.dumps(ref[0]) + "\n")
    train_ppo(toy_config(ws, crashed, resume=True, **kw))
    rows = [json.loads(x) for x in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows] == [1, 2, 3]
    for a, b in zip(rows[1:], ref[1:]):
        for key in ("reward", "kl", "value_mean", "policy_loss", "value_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)


def test_the_shared_heads_learning_rate_defaults_to_a_hundred_times_the_policys(tmp_path):
    """The value group of a shared backbone is one zero-initialised head: it gets 100 x --lr unless --value-lr
    says otherwise; a separate value model keeps --lr."""
    from finegrain.ppo.setup import load_models, preflight
    from finegrain.ppo.train import build_engine, make_accelerator

    ws = make_workspace(tmp_path)
    cfg = toy_config(ws, tmp_path / "out", value_init="shared", lr=1e-4)
    assert cfg.value_learning_rate() == pytest.approx(1e-2)
    assert toy_config(ws, tmp_path / "o", value_init="shared", lr=1e-4, value_lr=5e-3).value_learning_rate() == 5e-3
    assert toy_config(ws, tmp_path / "o", value_init="policy", lr=1e-4).value_learning_rate() == 1e-4
    run = preflight(cfg)
    acc = make_accelerator(cfg)
    e = build_engine(cfg, run, load_models(cfg, run, acc.device.type), acc)
    policy_group, value_group = e.optimizer.param_groups
    assert policy_group["lr"] == pytest.approx(1e-4) and value_group["lr"] == pytest.approx(1e-2)
    assert [p.shape for p in value_group["params"]] == [torch.Size([1, 32]), torch.Size([1])]  # the head alone


def test_the_head_reads_the_width_of_the_last_hidden_state_not_the_configs_hidden_size():
    """OPT-350m-style models project their last hidden state down (here 32 -> 16): the head follows the state."""
    from transformers import OPTConfig, OPTForCausalLM

    from finegrain.ppo.rollout import PolicyAndValue, ValueHead
    from finegrain.ppo.train import last_hidden_size

    torch.manual_seed(0)
    policy = OPTForCausalLM(OPTConfig(vocab_size=100, hidden_size=32, word_embed_proj_dim=16, num_hidden_layers=1,
                                      ffn_dim=64, num_attention_heads=2, max_position_embeddings=64,
                                      do_layer_norm_before=False)).eval()
    assert policy.config.hidden_size == 32 and last_hidden_size(policy) == 16
    tok = word_tokenizer()
    assert last_hidden_size(tiny(tok, "causal", 1)) == 32
    model = PolicyAndValue(policy, None, ValueHead(last_hidden_size(policy)))
    ids, mask, pos = _batch()
    _, values = model(ids, mask, pos)
    assert values.shape == (2, 5)


def test_value_head_round_trips_through_safetensors_and_refuses_pickle(tmp_path):
    from finegrain.ppo.rollout import ValueHead, load_value_head

    head = ValueHead(4)
    with torch.no_grad():
        head.linear.weight.copy_(torch.tensor([[0.5, -1.0, 2.0, 0.25]]))
        head.linear.bias.fill_(-0.75)
    head.save_pretrained(tmp_path)
    back = load_value_head(tmp_path)
    hidden = torch.tensor([[[1.0, 1.0, 1.0, 4.0]]])
    assert back(hidden).tolist() == [[0.5 - 1.0 + 2.0 + 1.0 - 0.75]]
    assert [p.name for p in tmp_path.iterdir()] == [ValueHead.FILE]
    with pytest.raises(ValueError, match="safetensors only"):
        head.save_pretrained(tmp_path / "pickle", safe_serialization=False)
