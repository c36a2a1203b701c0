"""bf16 weights with fp32 master weights (``MasterWeightAdamW``, ``finegrain ppo --param-dtype bf16``).

The optimizer must step exactly as fp32 AdamW would on the same gradients, keep updates far
below bf16's resolution, accumulate micro-batches, clip on the masters, and survive a
checkpoint; a PPO run with it trains in bf16, saves fp32 masters, resumes exactly, and its
forward computes what autocast over fp32 weights computes.
"""
from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from finegrain.training import MasterWeightAdamW, clip_gradients, hold_parameters_in, make_adamw
from test_ppo_train import make_workspace, toy_config

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # the PPO runs here change accelerate's precision


def _pair(seed: int = 0):
    """The same two-layer model twice: in fp32 (the reference) and held in bf16 (its values rounded)."""
    torch.manual_seed(seed)
    ref = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    with torch.no_grad():  # start from bf16-representable values, so both start equal
        for p in ref.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    low = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    low.load_state_dict(ref.state_dict())
    assert hold_parameters_in(low, torch.bfloat16) == 4
    return ref, low


def _grads(model, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g).to(torch.bfloat16) for p in model.parameters()]


def _set(model, grads, dtype):
    for p, g in zip(model.parameters(), grads):
        p.grad = g.to(dtype).clone()


def test_holding_parameters_in_bf16_keeps_their_identity_and_leaves_buffers_alone():
    m = torch.nn.BatchNorm1d(4)
    ids = [id(p) for p in m.parameters()]
    assert hold_parameters_in(m, torch.bfloat16) == 2
    assert [id(p) for p in m.parameters()] == ids and all(p.dtype == torch.bfloat16 for p in m.parameters())
    assert m.running_mean.dtype == torch.float32  # buffers (a rotary table's frequencies) stay fp32
    assert hold_parameters_in(m, torch.bfloat16) == 0


def test_masters_step_exactly_as_fp32_adamw_on_the_same_gradients_and_the_weights_are_them_rounded():
    ref, low = _pair()
    kw = dict(lr=1e-2, eps=1e-5, weight_decay=0.01)
    a = make_adamw(ref.parameters(), **kw)
    b = MasterWeightAdamW([{"params": list(low.parameters())}], **kw)
    for step in range(5):
        grads = _grads(ref, step)
        _set(ref, grads, torch.float32)
        _set(low, grads, torch.bfloat16)
        a.step(), b.step()
        a.zero_grad(), b.zero_grad()
        for r, m, p in zip(ref.parameters(), b.masters(), low.parameters()):
            assert m.dtype == torch.float32 and p.dtype == torch.bfloat16
            assert torch.equal(r.detach(), m)  # bit for bit: the same fused AdamW on the same fp32 numbers
            assert torch.equal(p.detach(), m.to(torch.bfloat16))
            assert p.grad is None and m.grad is None


def test_an_update_below_bf16_resolution_accumulates_on_the_master_instead_of_vanishing():
    """At lr 1e-5 each step moves a weight of ~0.3 by ~1e-5, a hundredth of its last bf16 bit: AdamW on the
    bf16 weights themselves loses every such step; on masters they add up to a change of the weights."""
    _, low = _pair()
    _, plain = _pair()
    start = [p.detach().clone() for p in low.parameters()]
    masters = MasterWeightAdamW([{"params": list(low.parameters())}], lr=1e-5)
    pure = torch.optim.AdamW(plain.parameters(), lr=1e-5, weight_decay=0.0)
    ones = [torch.ones_like(p) for p in low.parameters()]  # a constant gradient: Adam's step is lr per step
    for _ in range(1000):
        _set(low, ones, torch.bfloat16)
        _set(plain, ones, torch.bfloat16)
        masters.step(), pure.step()
        masters.zero_grad(), pure.zero_grad()
    w0, w_master, w_pure = start[0], next(low.parameters()).detach(), next(plain.parameters()).detach()
    big = w0.abs() > 0.1  # weights whose bf16 spacing (>= 2^-11) dwarfs a 1e-5 step
    assert big.sum() >= 5
    assert torch.equal(w_pure[big], w0[big])  # pure bf16 AdamW: every step rounded away
    moved = (w0 - masters.masters()[0])[big]  # the masters moved by lr x steps (less weight decay)
    assert torch.allclose(moved, torch.full_like(moved, 1e-2), rtol=0.05)
    assert (w_master[big] != w0[big]).float().mean() > 0.9  # and the bf16 weights followed them


def test_micro_batch_gradients_add_in_fp32_and_lr_is_set_through_param_groups():
    ref, low = _pair()
    a = make_adamw(ref.parameters(), lr=1.0)
    b = MasterWeightAdamW([{"params": list(low.parameters())}], lr=1.0)
    for group in (a.param_groups[0], b.param_groups[0]):
        group["lr"] = 3e-3  # as PPO sets its schedule
    g1, g2 = _grads(ref, 1), _grads(ref, 2)
    _set(low, g1, torch.bfloat16)
    b.gather_grads()  # a micro-batch: moved onto the masters
    assert all(p.grad is None for p in low.parameters())
    _set(low, g2, torch.bfloat16)
    for p, x, y in zip(ref.parameters(), g1, g2):
        p.grad = x.float() + y.float()
    a.step(), b.step()
    assert all(torch.equal(r.detach(), m) for r, m in zip(ref.parameters(), b.masters()))


def test_clipping_acts_on_the_masters_fp32_gradients():
    ref, low = _pair()
    b = MasterWeightAdamW([{"params": list(low.parameters())}], lr=1e-3)
    grads = [g * 10 for g in _grads(ref, 3)]
    _set(ref, grads, torch.float32)
    _set(low, grads, torch.bfloat16)
    expected = torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 1.0)
    norm = clip_gradients(None, low, b, 1.0)  # no accelerator needed on this path
    assert norm == pytest.approx(float(expected), rel=1e-6) and norm > 1.0
    for r, m in zip(ref.parameters(), b.masters()):
        assert torch.allclose(r.grad, m.grad, rtol=1e-6, atol=0)
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(m.grad) for m in b.masters()]))
    assert total == pytest.approx(1.0, rel=1e-5)


def test_a_saved_state_resumes_the_masters_and_moments_exactly():
    _, low = _pair()
    b = MasterWeightAdamW([{"params": list(low.parameters())}], lr=1e-3)
    for step in range(3):
        _set(low, _grads(low, step), torch.bfloat16)
        b.step()
        b.zero_grad()
    state = copy.deepcopy(b.state_dict())  # as written to disk: AdamW's state_dict holds its live moment tensors
    assert [s.dtype for s in state["masters"]] == [torch.float32] * 4
    _, fresh = _pair(seed=9)  # other starting weights: everything must come from the state
    c = MasterWeightAdamW([{"params": list(fresh.parameters())}], lr=5.0)
    c.load_state_dict(state)
    assert c.param_groups[0]["lr"] == 1e-3
    assert all(torch.equal(p.detach(), q.detach()) for p, q in zip(low.parameters(), fresh.parameters()))
    for opt, model in ((b, low), (c, fresh)):
        _set(model, _grads(model, 7), torch.bfloat16)
        opt.step()
    assert all(torch.equal(x, y) for x, y in zip(b.masters(), c.masters()))
    with pytest.raises(ValueError, match="not a MasterWeightAdamW state"):
        c.load_state_dict(make_adamw(torch.nn.Linear(2, 2).parameters()).state_dict())
    small = MasterWeightAdamW([{"params": list(torch.nn.Linear(2, 2).to(torch.bfloat16).parameters())}])
    with pytest.raises(ValueError, match="not this model's"):
        small.load_state_dict(state)


def test_restore_fp32_puts_the_masters_themselves_into_the_model():
    _, low = _pair()
    b = MasterWeightAdamW([{"params": list(low.parameters())}], lr=1e-4)
    _set(low, _grads(low, 0), torch.bfloat16)
    b.step()
    b.restore_fp32()
    for p, m in zip(low.parameters(), b.masters()):
        assert p.dtype == torch.float32 and torch.equal(p.detach(), m) and p.data_ptr() != m.data_ptr()


# ----------------------------------------------------------------------------- PPO --param-dtype bf16
def _rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_param_dtype_bf16_needs_bf16_autocast(tmp_path):
    from finegrain.errors import ConfigError

    ws = make_workspace(tmp_path)
    with pytest.raises(ConfigError, match="--mixed-precision bf16"):
        toy_config(ws, tmp_path / "out", param_dtype="bf16")


@pytest.mark.parametrize("value_init", ["policy", "shared"])
def test_a_bf16_weight_run_trains_in_bf16_and_saves_the_fp32_masters(tmp_path, value_init):
    from transformers import AutoModelForCausalLM

    from finegrain.ppo.setup import load_models, preflight
    from finegrain.ppo.train import train_ppo

    ws = make_workspace(tmp_path)
    cfg = toy_config(ws, tmp_path / "out", steps=3, mixed_precision="bf16", param_dtype="bf16",
                     value_init=value_init)
    models = load_models(cfg, preflight(cfg))
    seen: list[set] = []

    def watch(step, prompts, texts):  # the models' dtypes while the run trains
        seen.append({p.dtype for m in (models.policy, models.value_model, models.ref_policy, models.reward_model)
                     if m is not None for p in m.parameters()})
        return {}

    train_ppo(cfg, models=models, on_rollout=watch)
    assert seen == [{torch.bfloat16}] * 3
    rows = _rows(tmp_path / "out")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows) and rows[-1]["value_loss"] > 0
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final").state_dict()
    start = AutoModelForCausalLM.from_pretrained(ws["policy"]).state_dict()
    assert all(v.dtype == torch.float32 for v in final.values())
    changed = [k for k in final if not torch.equal(final[k], start[k])]
    assert changed
    # the saved weights are the masters, not bf16 values: most of them are not representable in bf16
    w = final[changed[0]]
    assert (w != w.to(torch.bfloat16).float()).float().mean() > 0.5


def test_a_bf16_weight_run_resumes_exactly(tmp_path):
    from finegrain.ppo.train import train_ppo

    ws = make_workspace(tmp_path)
    kw = dict(steps=3, batch_size=4, save_every=1, keep_checkpoints=3, mixed_precision="bf16", param_dtype="bf16")
    full = tmp_path / "full"
    train_ppo(toy_config(ws, full, **kw))
    ckpt = full / "checkpoints" / "step-00000001"
    crashed = tmp_path / "crashed"
    shutil.copytree(ckpt, crashed / "checkpoints" / ckpt.name)
    ref = _rows(full)
    (crashed / "metrics.jsonl").write_text(json.dumps(ref[0]) + "\n")
    train_ppo(toy_config(ws, crashed, resume=True, **kw))
    rows = _rows(crashed)
    assert [m["step"] for m in rows] == [1, 2, 3]
    for a, b in zip(rows[1:], ref[1:]):
        for key in ("reward", "kl", "value_mean", "policy_loss", "value_loss"):
            assert a[key] == b[key], (a["step"], key)  # the same masters and moments: the same bf16 numbers
    from safetensors.torch import load_file

    x, y = (load_file(str(d / "final" / "model.safetensors")) for d in (full, crashed))
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_a_lora_run_with_bf16_weights_saves_fp32_adapters_merged_into_the_fp32_base(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from finegrain.ppo.train import train_ppo

    ws = make_workspace(tmp_path)
    out = tmp_path / "out"
    train_ppo(toy_config(ws, out, steps=2, mixed_precision="bf16", param_dtype="bf16", use_lora=True, lora_r=4,
                         lora_alpha=8, lora_target_modules=["c_attn"], lr=1e-2))
    assert _rows(out)[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # adapters start at zero: policy == reference
    adapters = load_file(str(out / "final_adapter" / "adapter_model.safetensors"))
    assert adapters and all(v.dtype == torch.float32 for v in adapters.values())
    start = AutoModelForCausalLM.from_pretrained(ws["policy"]).state_dict()
    final = AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
    # the layers LoRA does not touch are the fp32 base itself, not its bf16 rounding
    untouched = [k for k in start if "c_attn" not in k]
    assert untouched and all(torch.equal(start[k], final[k]) for k in untouched)
    assert any(not torch.equal(start[k], final[k]) for k in start if "c_attn.weight" in k)


def test_the_bf16_weight_forward_computes_what_autocast_over_fp32_weights_computes(tmp_path):
    """Same model, same rollout tokens: log-probs and values of the bf16-held policy and value model are
    autocast's up to bf16 rounding of the activations."""
    from finegrain.ppo.rollout import PolicyAndValue, forward_response
    from finegrain.ppo.setup import load_models, preflight

    ws = make_workspace(tmp_path)
    cfg = toy_config(ws, tmp_path / "out", mixed_precision="bf16")
    models = load_models(cfg, preflight(cfg))
    low_policy, low_value = copy.deepcopy(models.policy), copy.deepcopy(models.value_model)
    hold_parameters_in(low_policy, torch.bfloat16)
    hold_parameters_in(low_value, torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    vocab = models.policy.config.vocab_size
    q = torch.randint(3, vocab, (4, 5), generator=g)
    r = torch.randint(3, vocab, (4, 6), generator=g)
    qm, rm = torch.ones_like(q), torch.ones_like(r)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        lp_a, v_a, _ = forward_response(PolicyAndValue(models.policy, models.value_model), q, qm, r, rm, 1.0)
        lp_b, v_b, _ = forward_response(PolicyAndValue(low_policy, low_value), q, qm, r, rm, 1.0)
    assert lp_a.dtype == lp_b.dtype == torch.float32
    assert (lp_a - lp_b).abs().max() < 0.1 and (v_a - v_b).abs().max() < 0.05
    assert (lp_a - lp_b).abs().mean() < 0.02
    assert not torch.equal(lp_a, lp_b)  # it is a different computation, not the same one twice


@pytest.mark.parametrize("saved,dtype,warned", [("float32", "bfloat16", True), ("bfloat16", "auto", True),
                                                ("float32", "auto", False)])
def test_training_bf16_weights_without_masters_warns_that_small_updates_vanish(tmp_path, caplog, saved, dtype,
                                                                                 warned):
    """--dtype bfloat16, or --dtype auto on a policy saved in bf16 (every model then loads in bf16), trains the
    bf16 weights themselves; auto on a float32 policy is float32 and says nothing."""
    import logging

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finegrain.models import save_checkpoint
    from finegrain.ppo.train import train_ppo

    ws = make_workspace(tmp_path)
    if saved == "bfloat16":
        policy = AutoModelForCausalLM.from_pretrained(ws["policy"], dtype=torch.bfloat16)
        save_checkpoint(ws["policy"], policy, AutoTokenizer.from_pretrained(ws["policy"]), {"kind": "policy"})
    with caplog.at_level(logging.WARNING, logger="finegrain.ppo"):
        train_ppo(toy_config(ws, tmp_path / "out", steps=1, dtype=dtype))
    said = [r.getMessage() for r in caplog.records if "rounded away" in r.getMessage()]
    assert bool(said) == warned
    assert all(f"--dtype {dtype}: AdamW steps the bfloat16 weights" in m and "--param-dtype bf16" in m for m in said)


def test_resuming_across_a_change_of_param_dtype_is_refused_in_one_line(tmp_path):
    """A checkpoint of an autocast run has no masters, and one of a bf16-weight run no plain AdamW state: resuming
    either with the other setting stops with one line naming the checkpoint, before any step runs."""
    from finegrain.errors import FinegrainError
    from finegrain.ppo.train import train_ppo

    ws = make_workspace(tmp_path)
    for first, then in (("fp32", "bf16"), ("bf16", "fp32")):
        out = tmp_path / f"from-{first}"
        kw = dict(steps=2, batch_size=4, save_every=1, mixed_precision="bf16")
        train_ppo(toy_config(ws, out, param_dtype=first, **kw))
        shutil.rmtree(out / "checkpoints" / "step-00000002")
        with pytest.raises(FinegrainError) as err:
            train_ppo(toy_config(ws, out, param_dtype=then, resume=True, **kw))
        message = str(err.value)
        assert "step-00000001" in message and "\n" not in message
        rows = _rows(out)
        assert [r["step"] for r in rows] == [1, 2]  # nothing ran, nothing was rewritten
