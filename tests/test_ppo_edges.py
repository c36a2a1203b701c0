"""PPO edge cases: gradient accumulation over responses of unequal length, the missing-EOS penalty and the
reward pipeline by hand, padding that must not leak into GAE or whitening, the LoRA reference."""
from __future__ import annotations

import copy

import pytest
import torch

from finegrain.ppo import core
from finegrain.ppo.rewards import RewardOutput
from test_ppo_rewards import _rollout_and_models

t = torch.tensor


# ----------------------------------------------------------------------------- gradient accumulation
def _update_gradients(model, rollout, grad_accum: int, **over) -> dict[str, torch.Tensor]:
    """The summed gradient of the first optimizer step of ``ppo_update`` (SGD, no clipping)."""
    from accelerate import Accelerator

    from finegrain.config import build_config
    from finegrain.ppo.config import PPOConfig
    from finegrain.ppo.train import ppo_update

    values = dict(policy="p", reward_model="r", reward_mode="sequence", prompts="x", output="o", batch_size=4,
                  num_minibatches=1, ppo_epochs=1, lr=1e-2, temperature=1.0, grad_accum=grad_accum,
                  max_grad_norm=None)
    cfg = build_config(PPOConfig, dict(values, **over))
    acc = Accelerator(cpu=True, gradient_accumulation_steps=grad_accum)
    m = copy.deepcopy(model)
    m, opt = acc.prepare(m, torch.optim.SGD(m.parameters(), lr=cfg.lr))
    grads: dict[str, torch.Tensor] = {}
    inner_step = opt.optimizer.step

    def step(*a, **k):
        if not grads:
            grads.update({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
        return inner_step(*a, **k)

    opt.optimizer.step = step
    ppo_update(acc, m, opt, rollout, cfg, step=0)
    return grads


def test_gradient_accumulation_over_unequal_lengths_equals_the_whole_minibatch():
    """--grad-accum 2 must give the gradient of the whole minibatch (the token mean over all its responses),
    not the mean of the two micro-batches' token means. Responses of 1, 1, n and 1 tokens: step 0's
    permutation puts rows {0, 1} (2 tokens) in one micro-batch and {2, 3} (n + 1 tokens) in the other.
    Before the fix the short micro-batch's tokens weighed (n + 1) / 2 times as much as the long one's."""
    from finegrain.ppo.rollout import RewardSettings, process_rewards

    tok, model, r, scores = _rollout_and_models(cut_responses_at={0: 1, 1: 1, 3: 1})
    lengths = r.response_mask.sum(-1).tolist()
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(0)).tolist()  # ppo_update's, seed 0 step 0
    halves = [sum(lengths[i] for i in perm[:2]), sum(lengths[i] for i in perm[2:])]
    assert halves[0] != halves[1], (lengths, perm)  # the case needs micro-batches of unequal token counts
    s = RewardSettings("sequence", "k1", "raw", None, 1.0, False, 1.0, 0.95, True)
    r = process_rewards(r, RewardOutput(scores, None, r.response_mask.sum(-1) + 1), 0.05,
                        s).tensors_out_of_inference_mode()
    whole, split = _update_gradients(model, r, 1), _update_gradients(model, r, 2)
    assert whole.keys() == split.keys() and whole
    for k in whole:
        torch.testing.assert_close(split[k], whole[k], atol=1e-6, rtol=1e-4, msg=k)


# ----------------------------------------------------------------------------- rewards by hand
def _hand_rollout(ended):
    """Two rollouts of 3 and 2 tokens whose k1 KL is [[.1, .2, .3], [.4, .5, -]], values 0."""
    from finegrain.ppo.rollout import Rollout

    mask = t([[1, 1, 1], [1, 1, 0]])
    logprobs = t([[0.1, 0.2, 0.3], [0.4, 0.5, 7.0]]) - 1.0
    ref = torch.full((2, 3), -1.0)
    zeros = torch.zeros(2, 3)
    return Rollout(["a", "b"], ["x", "y"], torch.ones(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.long),
                   torch.ones(2, 3, dtype=torch.long), mask, t(ended), logprobs, ref, zeros, zeros, t([3.0, -0.5]))


def test_sequence_rewards_by_hand_with_clip_and_missing_eos_penalty():
    """kl_coef .5, --reward-clip 2, --missing-eos-penalty 1, gamma = lambda = 1, V = 0, no whitening.

    non-score: [[-.05, -.1, -.15], [-.2, -.25, 0]]; scores clipped to [2, -.5]; row 1 never ended (-1):
    rewards [[-.05, -.1, -.15 + 2], [-.2, -.25 - .5 - 1, 0]] = [[-.05, -.1, 1.85], [-.2, -1.75, 0]];
    advantages = reward-to-go: [[1.7, 1.75, 1.85], [-1.95, -1.75, 0]].
    """
    from finegrain.ppo.rollout import RewardSettings, process_rewards

    r = _hand_rollout([True, False])
    s = RewardSettings("sequence", "k1", "raw", 2.0, 1.0, False, 1.0, 1.0, False)
    got = process_rewards(r, RewardOutput(r.scores, None, t([4, 3])), 0.5, s)
    torch.testing.assert_close(got.kl, t([[0.1, 0.2, 0.3], [0.4, 0.5, 0.0]]))
    torch.testing.assert_close(got.non_score_rewards, t([[-0.05, -0.1, -0.15], [-0.2, -0.25, 0.0]]))
    torch.testing.assert_close(got.rewards, t([[-0.05, -0.1, 1.85], [-0.2, -1.75, 0.0]]))
    torch.testing.assert_close(got.advantages, t([[1.7, 1.75, 1.85], [-1.95, -1.75, 0.0]]))
    torch.testing.assert_close(got.returns, got.advantages)
    # both ended: no penalty anywhere; penalty off: the same as both ended
    both = process_rewards(_hand_rollout([True, True]), RewardOutput(r.scores, None, t([4, 3])), 0.5, s)
    off = process_rewards(r, RewardOutput(r.scores, None, t([4, 3])), 0.5,
                          RewardSettings("sequence", "k1", "raw", 2.0, None, False, 1.0, 1.0, False))
    torch.testing.assert_close(both.rewards, t([[-0.05, -0.1, 1.85], [-0.2, -0.75, 0.0]]))
    torch.testing.assert_close(off.rewards, both.rewards)


def test_token_rewards_by_hand_with_clip_mean_scale_and_missing_eos_penalty():
    """r_t = [[1, 0, 5], [.5, -4, 9 (padding)]], clipped to +-2, divided by T = 3 (n_scored):
    [[1/3, 0, 2/3], [1/6, -2/3, 0]]; minus .5 KL; row 1 (not ended) loses 1 at its last token."""
    from finegrain.ppo.rollout import RewardSettings, process_rewards

    r = _hand_rollout([True, False])
    tr = t([[1.0, 0.0, 5.0], [0.5, -4.0, 9.0]])
    s = RewardSettings("token", "k1", "mean", 2.0, 1.0, False, 1.0, 1.0, False)
    got = process_rewards(r, RewardOutput(t([2.0, -0.5]), tr, t([3, 3])), 0.5, s)
    torch.testing.assert_close(got.token_rewards, t([[1 / 3, 0.0, 2 / 3], [1 / 6, -2 / 3, 0.0]]))
    torch.testing.assert_close(got.rewards, t([[1 / 3 - 0.05, -0.1, 2 / 3 - 0.15],
                                               [1 / 6 - 0.2, -2 / 3 - 0.25 - 1.0, 0.0]]))


def test_a_whole_response_term_joins_the_token_rewards_at_the_last_token():
    """--sequence-reward-model: its standardised score x coef (``whole``, here [.8, -1.2]) is added at each
    response's last token, beside the missing-EOS penalty; the token rewards of the test above are unchanged.
    rewards [[1/3 - .05, -.1, 2/3 - .15 + .8], [1/6 - .2, -2/3 - .25 - 1 - 1.2, 0]]; gamma = lambda = 1 and
    V = 0, so the advantages are the rewards to go."""
    from finegrain.ppo.rollout import RewardSettings, process_rewards

    r = _hand_rollout([True, False])
    tr = t([[1.0, 0.0, 5.0], [0.5, -4.0, 9.0]])
    s = RewardSettings("token", "k1", "mean", 2.0, 1.0, False, 1.0, 1.0, False)
    got = process_rewards(r, RewardOutput(t([2.0, -0.5]), tr, t([3, 3])), 0.5, s, whole=t([0.8, -1.2]))
    torch.testing.assert_close(got.token_rewards, t([[1 / 3, 0.0, 2 / 3], [1 / 6, -2 / 3, 0.0]]))
    rewards = t([[1 / 3 - 0.05, -0.1, 2 / 3 - 0.15 + 0.8], [1 / 6 - 0.2, -2 / 3 - 0.25 - 1.0 - 1.2, 0.0]])
    torch.testing.assert_close(got.rewards, rewards)
    torch.testing.assert_close(got.advantages, rewards.flip(1).cumsum(1).flip(1))
    # in sequence mode it adds to the RM's score in the same place
    seq = process_rewards(r, RewardOutput(t([2.0, -0.5]), None, t([3, 3])), 0.5,
                          RewardSettings("sequence", "k1", "raw", None, None, False, 1.0, 1.0, False),
                          whole=t([0.8, -1.2]))
    torch.testing.assert_close(seq.rewards, t([[-0.05, -0.1, -0.15 + 2.0 + 0.8], [-0.2, -0.25 - 0.5 - 1.2, 0.0]]))


def test_adaptive_kl_controller_clips_the_error_below_too():
    ctl = core.AdaptiveKLController(0.2, target=6.0, horizon=1000)
    ctl.update(0.0, 50)  # error = clip(0 / 6 - 1, +-.2) = -.2 -> .2 * (1 - .2 * 50 / 1000) = .198
    assert ctl.value == pytest.approx(0.198)
    ctl.update(6.0, 50)  # on target: unchanged
    assert ctl.value == pytest.approx(0.198)



def test_rollout_statistics_by_hand():
    """The hand rollout of the sequence test with both rows ended: summed KL .6 and .9, rewards
    [[-.05, -.1, 1.85], [-.2, -.75, 0]] (sums 1.7 and -.95), advantages = reward-to-go, V = 0."""
    from finegrain.ppo.rollout import RewardSettings, process_rewards, rollout_stats

    r = _hand_rollout([True, False])
    s = RewardSettings("sequence", "k1", "raw", 2.0, None, False, 1.0, 1.0, False)
    st = rollout_stats(process_rewards(r, RewardOutput(r.scores, None, t([4, 3])), 0.5, s))
    assert st["reward"] == pytest.approx(1.25)  # the RM scores (3, -.5) as given, before clipping
    assert st["kl"] == pytest.approx(0.75) and st["non_score_reward"] == pytest.approx(-0.375)
    assert st["total_reward"] == pytest.approx((1.7 - 0.95) / 2)
    assert st["response_length"] == pytest.approx(2.5) and st["eos_rate"] == pytest.approx(0.5)
    # advantages [[1.7, 1.75, 1.85], [-.95, -.75]] over the 5 real tokens
    assert st["advantage_mean"] == pytest.approx((1.7 + 1.75 + 1.85 - 0.95 - 0.75) / 5)
    assert st["return_mean"] == pytest.approx(st["advantage_mean"]) and st["value_mean"] == 0.0
    assert st["explained_variance"] == pytest.approx(0.0)  # V = 0 explains nothing


# ----------------------------------------------------------------------------- padding must not leak
def test_gae_and_whitening_ignore_whatever_sits_on_padding():
    """Right-padded rows give each real token the advantage it has in its row alone, whatever the padded
    rewards and values hold; whitening uses the real tokens' statistics only, and padding stays 0."""
    g = torch.Generator().manual_seed(0)
    mask = t([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    rewards, values = torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g)
    noisy_r = torch.where(mask.bool(), rewards, torch.full_like(rewards, 1e3))
    noisy_v = torch.where(mask.bool(), values, torch.full_like(values, -1e3))
    adv, ret = core.gae(noisy_r, noisy_v, mask, 0.9, 0.8)
    for i, n in enumerate(mask.sum(-1).tolist()[:3]):  # (row 3 is all padding)
        alone, alone_ret = core.gae(rewards[i:i + 1, :n], values[i:i + 1, :n], torch.ones(1, n), 0.9, 0.8)
        torch.testing.assert_close(adv[i, :n], alone[0])
        torch.testing.assert_close(ret[i, :n], alone_ret[0])
    assert (adv[~mask.bool()] == 0).all() and (ret[~mask.bool()] == 0).all()
    w = core.masked_whiten(torch.where(mask.bool(), adv, torch.full_like(adv, 50.0)), mask)
    real = adv[mask.bool()]
    torch.testing.assert_close(w[mask.bool()], (real - real.mean()) / real.std(), atol=1e-5, rtol=1e-5)
    assert (w[~mask.bool()] == 0).all()


# ----------------------------------------------------------------------------- LoRA reference
def test_lora_reference_is_the_policy_with_its_adapters_off_once_they_have_moved():
    """A LoRA policy whose adapters are no longer zero: the reference log-probs are the base model's (adapters
    disabled), the policy's differ from them, and the adapters are back on afterwards."""
    from peft import LoraConfig, get_peft_model

    from finegrain.ppo.rollout import PolicyAndValue, score_rollout_forward
    from test_ppo_train import tiny, word_tokenizer

    tok = word_tokenizer()
    base = tiny(tok, "causal", 1)
    pristine = copy.deepcopy(base)
    policy = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    model = PolicyAndValue(policy.eval(), tiny(tok, "token", 2))
    q, qm = t([[0, 12, 13, 5]]), t([[0, 1, 1, 1]])
    r, rm = t([[11, 4, 0], [6, 0, 1]])[:1], t([[1, 1, 1]])
    out = score_rollout_forward(model, None, policy, q, qm, r, rm, 1.0, 4, "cpu")
    plain = score_rollout_forward(PolicyAndValue(pristine, tiny(tok, "token", 2)), pristine, None, q, qm, r, rm,
                                  1.0, 4, "cpu")
    torch.testing.assert_close(out["ref_logprobs"], plain["logprobs"])
    assert (out["logprobs"] - out["ref_logprobs"]).abs().max() > 1e-3
    again = score_rollout_forward(model, None, policy, q, qm, r, rm, 1.0, 4, "cpu")
    torch.testing.assert_close(again["logprobs"], out["logprobs"])  # the adapters are on again


# ----------------------------------------------------------------------------- minibatch count and checkpoints
def test_num_minibatches_that_does_not_divide_the_batch_is_refused():
    """--batch-size 10 --num-minibatches 4 used to run 5 minibatches of 2 (and 8 / 3: 4 of 2) without a word."""
    from finegrain.config import build_config
    from finegrain.errors import ConfigError
    from finegrain.ppo.config import PPOConfig

    base = dict(policy="p", reward_model="r", reward_mode="token", prompts="x.jsonl", output="o")
    for bs, nm in ((10, 4), (8, 3), (12, 8)):
        with pytest.raises(ConfigError, match=f"--num-minibatches {nm} does not divide --batch-size {bs}"):
            build_config(PPOConfig, dict(base, batch_size=bs, num_minibatches=nm))
    assert build_config(PPOConfig, dict(base, batch_size=12, num_minibatches=3)).minibatch_size() == 4
    assert build_config(PPOConfig, dict(base, batch_size=2)).minibatch_size() == 1  # more minibatches than rollouts
    assert build_config(PPOConfig, dict(base, batch_size=10, num_minibatches=4, mini_batch_size=5)).minibatch_size() == 5


def test_keep_checkpoints_keeps_the_newest_and_the_last_one_resumes(tmp_path):
    import json

    from finegrain.ppo.train import train_ppo
    from test_ppo_train import make_workspace, toy_config

    ws = make_workspace(tmp_path)
    kw = dict(steps=3, batch_size=4, ppo_epochs=1, save_every=1, keep_checkpoints=2, sample_every=0)
    train_ppo(toy_config(ws, tmp_path / "out", **kw))
    ck = tmp_path / "out" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step-00000002", "step-00000003"]
    assert train_ppo(toy_config(ws, tmp_path / "out", resume=True, **kw))["resumed_from"] == 3
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows] == [1, 2, 3]


def test_a_resume_with_options_that_change_its_steps_is_refused_and_one_that_extends_the_run_goes_on(tmp_path):
    """A resume took any options: another --kl-coef or --batch-size continued another run's steps silently."""
    from finegrain.errors import ConfigError
    from finegrain.ppo.train import train_ppo
    from test_ppo_train import make_workspace, toy_config

    ws = make_workspace(tmp_path)
    kw = dict(steps=2, batch_size=4, ppo_epochs=1, save_every=1, sample_every=0)
    train_ppo(toy_config(ws, tmp_path / "out", **kw))
    for change, message in ((dict(kl_coef=0.5), "--kl-coef is 0.5 here but was 0.01 in that run"),
                            (dict(batch_size=8, num_minibatches=4), "--batch-size is 8 here but was 4"),
                            (dict(lr_schedule="linear"), "--lr-schedule is 'linear' here but was 'constant'")):
        with pytest.raises(ConfigError, match=message) as other:
            train_ppo(toy_config(ws, tmp_path / "out", resume=True, **dict(kw, **change)))
        assert "more --steps" not in str(other.value)
    # more steps at a constant rate, and other saving and sampling intervals: the same run, continued
    more = train_ppo(toy_config(ws, tmp_path / "out", resume=True, **dict(kw, steps=3, save_every=3, sample_every=1)))
    assert more["resumed_from"] == 2 and more["steps"] == 3
    # under the linear schedule the rate decays over --steps: more of them would be another schedule
    linear = dict(kw, lr_schedule="linear")
    train_ppo(toy_config(ws, tmp_path / "linear", **linear))
    with pytest.raises(ConfigError, match="--steps is 3 here but was 2 in that run") as refused:
        train_ppo(toy_config(ws, tmp_path / "linear", resume=True, **dict(linear, steps=3)))
    # ... and the refusal says which runs can be extended (only for --steps)
    assert "a run made with --lr-schedule constant can be resumed with more --steps" in str(refused.value)
    assert "\n" not in str(refused.value)


def test_an_accelerator_passed_in_must_accumulate_as_grad_accum_says(tmp_path):
    """It decides when the optimizer steps: one built without --grad-accum 2 stepped on every micro-batch."""
    from accelerate import Accelerator

    from finegrain.errors import ConfigError
    from finegrain.ppo.train import train_ppo
    from test_ppo_train import make_workspace, toy_config

    ws = make_workspace(tmp_path)
    with pytest.raises(ConfigError, match="accumulates 1 micro-batches per optimizer step, --grad-accum 2"):
        train_ppo(toy_config(ws, tmp_path / "out", grad_accum=2), accelerator=Accelerator(cpu=True))


# ----------------------------------------------------------------------------- empty responses
def test_a_batch_of_empty_responses_scores_and_trains_on_the_eos_alone():
    """Every response is EOS alone (text ""): the RM scores the closing EOS (T = 1), the reward sits on that one
    token, and nothing is NaN; an all-padding row gets zeros throughout."""
    from finegrain.ppo.rewards import RewardScorer
    from finegrain.ppo.rollout import RewardSettings, Rollout, process_rewards
    from test_ppo_train import hand_token_rm, word_tokenizer

    tok = word_tokenizer()
    q = [tok("say x :", add_special_tokens=False)["input_ids"]] * 3
    r_ids = t([[tok.eos_token_id, 1], [tok.eos_token_id, 1], [1, 1]])
    r_mask = t([[1, 0], [1, 0], [0, 0]])  # row 2: all padding
    out = RewardScorer(hand_token_rm(tok), tok, "token", tok, max_length=32).score(["say x"] * 3, q, r_ids, r_mask,
                                                                                   ["", "", ""])
    assert out.n_scored[:2].tolist() == [1, 1]
    torch.testing.assert_close(out.token_rewards[:2, 0], out.scores[:2])  # Eq. 1 over the EOS alone
    assert (out.token_rewards[:, 1] == 0).all() and (out.token_rewards[2] == 0).all()
    zeros = torch.zeros(3, 2)
    r = Rollout(["a"] * 3, [""] * 3, torch.ones(3, 1, dtype=torch.long), torch.ones(3, 1, dtype=torch.long), r_ids,
                r_mask, t([True, True, False]), zeros, zeros, zeros, zeros, out.scores)
    for mode in ("token", "sequence"):
        s = RewardSettings(mode, "k3", "mean", None, 1.0, True, 1.0, 0.95, True)
        got = process_rewards(r, out, 0.1, s)
        for name in ("rewards", "advantages", "returns"):
            v = getattr(got, name)
            assert v.isfinite().all() and (v[~r_mask.bool()] == 0).all(), (mode, name)
    pl = core.policy_loss(torch.zeros(3, 2, requires_grad=True), zeros, zeros, torch.zeros(3, 2), 0.2)
    vl, _ = core.value_loss(zeros, zeros, zeros, torch.zeros(3, 2), 0.2)
    assert pl.loss.item() == 0.0 and vl.item() == 0.0  # an all-padding minibatch: no loss, no NaN


# ----------------------------------------------------------------------------- resume with LoRA
def test_a_lora_run_resumes_to_the_uninterrupted_runs_numbers_and_weights(tmp_path):
    """Resumed from its step-1 checkpoint, a LoRA run (adapters, their optimizer state, and the reference
    that is the base with them off) makes the uninterrupted run's steps 2 and 3 and the same final policy."""
    import json
    import shutil

    from transformers import AutoModelForCausalLM

    from finegrain.ppo.train import train_ppo
    from test_ppo_train import make_workspace, toy_config

    ws = make_workspace(tmp_path)
    kw = dict(steps=3, batch_size=4, ppo_epochs=1, save_every=1, keep_checkpoints=3, sample_every=0, use_lora=True,
              lora_r=4, lora_alpha=8, lora_target_modules=["c_attn"], lr=1e-2, adaptive_kl=True)
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    train_ppo(toy_config(ws, full, **kw))
    shutil.copytree(full / "checkpoints" / "step-00000001", crashed / "checkpoints" / "step-00000001")
    ref = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    (crashed / "metrics.jsonl").write_text(json.dumps(ref[0]) + "\n" + json.dumps(dict(ref[1], step=2)) + "\n")
    train_ppo(toy_config(ws, crashed, resume=True, **kw))
    rows = [json.loads(x) for x in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows] == [1, 2, 3]  # the step-2 line the kill left behind is written once
    assert abs(ref[2]["kl"]) > 1e-6  # the adapters have moved: the KL says which reference was used
    for a, b in zip(rows[1:], ref[1:]):
        for key in ("kl_coef", "reward", "kl", "policy_loss", "value_loss", "approx_kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    w_full = AutoModelForCausalLM.from_pretrained(full / "final").state_dict()
    w_res = AutoModelForCausalLM.from_pretrained(crashed / "final").state_dict()
    assert max((w_full[k] - w_res[k]).abs().max().item() for k in w_full) < 1e-6


def test_lora_dropout_which_ppo_never_applies_is_refused():
    """Every PPO model runs in eval mode (dropout off), so --lora-dropout 0.1 used to be accepted and ignored."""
    from finegrain.config import build_config
    from finegrain.errors import ConfigError
    from finegrain.ppo.config import PPOConfig

    base = dict(policy="p", reward_model="r", reward_mode="token", prompts="x.jsonl", output="o", use_lora=True)
    with pytest.raises(ConfigError, match="--lora-dropout 0.1 would do nothing"):
        build_config(PPOConfig, dict(base, lora_dropout=0.1))
    assert build_config(PPOConfig, base).lora_dropout == 0.0


# ----------------------------------------------------------------------------- schedule and data order
def test_learning_rate_factor_by_hand():
    from finegrain.config import build_config
    from finegrain.ppo.config import PPOConfig
    from finegrain.ppo.train import lr_factor

    base = dict(policy="p", reward_model="r", reward_mode="token", prompts="x.jsonl", output="o", steps=4)
    linear = build_config(PPOConfig, base)
    assert [lr_factor(linear, s) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]  # 1 - step / steps, never 0
    constant = build_config(PPOConfig, dict(base, lr_schedule="constant"))
    assert [lr_factor(constant, s) for s in range(4)] == [1.0] * 4


def test_batch_indices_visit_every_prompt_once_per_epoch_across_ranks():
    """The global stream (rank 0's slice, then rank 1's, step after step) is one permutation per epoch."""
    from finegrain.ppo.train import batch_indices

    n, bs, world = 10, 3, 2
    stream = [i for step in range(10) for rank in range(world) for i in batch_indices(n, step, bs, rank, world, 5)]
    epochs = [stream[k:k + n] for k in range(0, len(stream), n)]
    assert len(epochs) == 6 and all(sorted(e) == list(range(n)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled each epoch
    assert batch_indices(n, 7, bs, 1, world, 5) == stream[7 * 6 + 3:7 * 6 + 6]  # a pure function of the step
    assert batch_indices(n, 0, bs, 0, world, 6) != batch_indices(n, 0, bs, 0, world, 5)  # and of the seed


def test_the_echo_view_reaches_the_scorer_ppo_builds(tmp_path):
    """test_ppo_train's echo run scores with the hand-built RM, whose r_t depend on the token alone, so echo and
    causal inputs score alike there: here the RM input PPO builds is checked to be the doubled one."""
    import json

    from finegrain.ppo.setup import load_models, preflight
    from finegrain.ppo.train import build_engine, make_accelerator
    from test_ppo_train import make_workspace, toy_config

    ws = make_workspace(tmp_path)
    meta = json.loads((tmp_path / "rm" / "finegrain.json").read_text())
    (tmp_path / "rm" / "finegrain.json").write_text(json.dumps(dict(meta, token_view="echo")))
    cfg = toy_config(ws, tmp_path / "out")
    run = preflight(cfg)
    acc = make_accelerator(cfg)
    e = build_engine(cfg, run, load_models(cfg, run, acc.device.type), acc)
    q, eos = run.query_ids[0], run.tokenizer.eos_token_id
    (ex,) = e.scorer.examples([run.prompts[0]], [q], t([[11, 4, eos]]), t([[1, 1, 1]]), ["x a"])
    assert ex.input_ids == q + [11, 4, eos, 11, 4, eos]
    assert ex.response_end - ex.response_start == 3  # T of Eq. 1: one copy of the response and its EOS


def test_an_adaptive_kl_coefficient_that_starts_at_zero_is_refused():
    """The adaptive controller multiplies beta: from 0 it would stay 0 for the whole run, silently."""
    from finegrain.config import build_config
    from finegrain.errors import ConfigError
    from finegrain.ppo.config import PPOConfig

    base = dict(policy="p", reward_model="r", reward_mode="token", prompts="x.jsonl", output="o", adaptive_kl=True)
    with pytest.raises(ConfigError, match="--kl-coef of 0 never moves"):
        build_config(PPOConfig, dict(base, kl_coef=0.0))
    assert build_config(PPOConfig, dict(base, kl_coef=0.1)).initial_kl_coef() == 0.1
    assert build_config(PPOConfig, dict(base, kl_coef=0.0, adaptive_kl=False)).initial_kl_coef() == 0.0


def test_a_run_shorter_than_sample_every_writes_samples_at_its_last_step(tmp_path):
    """samples.jsonl stayed empty for a run of fewer steps than --sample-every (default 10); the last step writes
    samples too, once (a last step on the interval is not written twice), and --sample-every 0 still writes none."""
    import json

    from finegrain.ppo.train import train_ppo
    from test_ppo_train import make_workspace, toy_config

    ws = make_workspace(tmp_path)
    kw = dict(batch_size=4, ppo_epochs=1, num_minibatches=1, save_every=10, num_samples=2)
    for name, steps, every, want in (("short", 2, 10, [2, 2]), ("on", 2, 2, [2, 2]), ("off", 1, 0, [])):
        train_ppo(toy_config(ws, tmp_path / name, steps=steps, sample_every=every, **kw))
        rows = (tmp_path / name / "samples.jsonl").read_text().splitlines() \
            if (tmp_path / name / "samples.jsonl").exists() else []
        assert [json.loads(x)["step"] for x in rows] == want, name


def test_resume_without_a_checkpoint_says_so_and_starts_at_step_0(tmp_path, caplog):
    """ppo --resume on an output with no checkpoint trained from step 0 without a word: one warning line says it."""
    import logging

    from finegrain.ppo.train import train_ppo
    from test_ppo_train import make_workspace, toy_config

    ws = make_workspace(tmp_path)
    with caplog.at_level(logging.WARNING, logger="finegrain.training"):
        summary = train_ppo(toy_config(ws, tmp_path / "out", resume=True, steps=1, batch_size=4, ppo_epochs=1,
                                       num_minibatches=1, sample_every=0))
    assert summary["resumed_from"] == 0
    assert [r.getMessage() for r in caplog.records if r.name == "finegrain.training"] == [
        f"--resume: no checkpoint in {tmp_path / 'out' / 'checkpoints'}; starting from step 0"]
