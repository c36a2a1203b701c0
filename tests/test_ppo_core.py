"""finegrain.ppo.core against hand-computed numbers (the arithmetic is written out in comments)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from finegrain.ppo import core

t = torch.tensor


def test_masked_mean_var_whiten():
    x, m = t([[1.0, 2.0], [3.0, 100.0]]), t([[1, 1], [1, 0]])
    assert core.masked_mean(x, m).item() == pytest.approx(2.0)  # (1 + 2 + 3) / 3; 100 is padding
    # unbiased variance of {1, 2, 3}: ((1-2)^2 + 0 + (3-2)^2) / (3 - 1) = 1
    assert core.masked_var(x, m).item() == pytest.approx(1.0)
    assert core.masked_var(x, m, unbiased=False).item() == pytest.approx(2 / 3)
    w = core.masked_whiten(x, m)
    assert torch.allclose(w, t([[-1.0, 0.0], [1.0, 0.0]]), atol=1e-6)  # (x - 2) / 1, padding -> 0
    w = core.masked_whiten(x, m, shift_mean=False)
    assert torch.allclose(w, t([[1.0, 2.0], [3.0, 0.0]]), atol=1e-6)  # (x - 2) / 1 + 2
    assert torch.allclose(core.masked_mean(x, m, dim=1), t([1.5, 3.0]))


def test_logprobs_and_entropy():
    logits = torch.log(t([[[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]]]))  # (1, 2, 3)
    lp = core.logprobs_from_logits(logits, t([[0, 2]]))
    assert torch.allclose(lp, torch.log(t([[0.5, 1 / 3]])))
    ent = core.entropy_from_logits(logits)
    # H(.5,.25,.25) = .5 ln2 + 2 * .25 ln4 = 1.5 ln2 ; H(uniform 3) = ln3
    assert torch.allclose(ent, t([[1.5 * math.log(2), math.log(3)]]), atol=1e-6)


def test_kl_estimators_by_hand():
    logp, ref = torch.log(t([0.5])), torch.log(t([0.25]))
    # k1 = log pi - log pi_ref = ln 0.5 - ln 0.25 = ln 2
    assert core.kl_estimate(logp, ref, "k1").item() == pytest.approx(math.log(2))
    # r = pi_ref / pi = 0.5 ; k3 = (r - 1) - ln r = -0.5 + ln 2
    assert core.kl_estimate(logp, ref, "k3").item() == pytest.approx(-0.5 + math.log(2))
    with pytest.raises(ValueError):
        core.kl_estimate(logp, ref, "k2")


@pytest.mark.parametrize("est", ["k1", "k3"])
def test_kl_estimators_are_unbiased(est):
    """E_{a~p}[k(a)] summed exactly over the support equals KL(p || q) for both estimators."""
    p, q = t([0.7, 0.2, 0.1]), t([0.2, 0.5, 0.3])
    kl = (p * (p.log() - q.log())).sum()
    expected = (p * core.kl_estimate(p.log(), q.log(), est)).sum()
    assert expected.item() == pytest.approx(kl.item(), rel=1e-6)
    if est == "k3":
        assert (core.kl_estimate(p.log(), q.log(), "k3") >= 0).all()


def test_assemble_rewards_sequence_and_token():
    kl = t([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    # non-score = -0.5 * kl on real tokens: [[-.05, -.1, -.15], [-.2, -.25, 0]]
    rewards, non_score = core.assemble_rewards(kl, mask, 0.5, score=t([2.0, -1.0]))
    assert torch.allclose(non_score, t([[-0.05, -0.1, -0.15], [-0.2, -0.25, 0.0]]))
    # the score lands on each row's last real token: -.15 + 2 = 1.85 ; -.25 - 1 = -1.25
    assert torch.allclose(rewards, t([[-0.05, -0.1, 1.85], [-0.2, -1.25, 0.0]]))
    tok = t([[1.0, 0.0, 1.0], [0.5, 0.5, 9.0]])  # 9.0 sits on padding and must vanish
    rewards, _ = core.assemble_rewards(kl, mask, 0.5, token_rewards=tok, terminal_bonus=t([-1.0, 0.0]))
    # [[1-.05, 0-.1, 1-.15-1], [.5-.2, .5-.25, 0]]
    assert torch.allclose(rewards, t([[0.95, -0.1, -0.15], [0.3, 0.25, 0.0]]))
    with pytest.raises(ValueError):
        core.assemble_rewards(kl, mask, 0.5)


def test_token_rewards_zero_but_last_equal_sequence_rewards():
    kl, mask = torch.rand(3, 5), t([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    score = t([0.3, -2.0, 1.5])
    tok = torch.zeros(3, 5)
    tok[0, 4], tok[1, 1], tok[2, 0] = score
    a, _ = core.assemble_rewards(kl, mask, 0.1, score=score)
    b, _ = core.assemble_rewards(kl, mask, 0.1, token_rewards=tok)
    assert torch.equal(a, b)


def test_scale_token_rewards():
    r, m = t([[2.0, 4.0, 6.0]]), t([[1, 1, 1]])
    assert torch.equal(core.scale_token_rewards(r, m, "raw"), r)
    # mean: divided by T = 4 RM positions (3 tokens + closing token): [.5, 1, 1.5], sum 3 = Eq. 1 mean of (2,4,6,0)
    assert torch.allclose(core.scale_token_rewards(r, m, "mean", t([4])), t([[0.5, 1.0, 1.5]]))
    assert torch.allclose(core.scale_token_rewards(r, m, "mean"), t([[2 / 3, 4 / 3, 2.0]]))


def test_scale_token_rewards_prefix_by_hand():
    # prefix means of (2, 4, 6): 2, 3, 4 -> steps 2, 1, 1 (sum 4 = Eq. 1's mean); padding gets 0
    r, m = t([[2.0, 4.0, 6.0, 9.0], [-1.0, 3.0, 0.0, 0.0]]), t([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert torch.allclose(core.scale_token_rewards(r, m, "prefix"), t([[2.0, 1.0, 1.0, 0.0], [-1.0, 2.0, 0.0, 0.0]]))
    # T = 4 RM positions for 3 policy tokens: c = 3 / 4 -> 1.5, 0.75, 0.75 (sum 3 = (2 + 4 + 6 + 0) / 4)
    got = core.scale_token_rewards(r[:1], m[:1], "prefix", t([4]))
    assert torch.allclose(got, t([[1.5, 0.75, 0.75, 0.0]]))
    with pytest.raises(ValueError, match="raw, mean or prefix"):
        core.scale_token_rewards(r, m, "median")


def test_prefix_credits_a_longer_answer_with_its_effect_on_the_mean():
    """The return from token t (gamma = lam = 1, V = 0) is what tokens t.. do to Eq. 1's mean under ``prefix``;
    under ``mean`` it leaves out that a longer answer divides the earlier tokens' rewards by a larger T."""
    zero = torch.zeros(1, 4)
    long_r, long_m = t([[4.0, 4.0, 1.0, 1.0]]), t([[1, 1, 1, 1]])    # two more tokens of reward 1
    short_r, short_m = t([[4.0, 4.0, 0.0, 0.0]]), t([[1, 1, 0, 0]])  # stops after two tokens
    # Eq. 1: the long answer's mean is 10 / 4 = 2.5, the short one's 8 / 2 = 4: going on costs 1.5
    for scale, cont, stop in (("prefix", 2.5 - 4.0, 0.0), ("mean", 2 / 4, 0.0)):
        ret_long, _ = core.gae(core.scale_token_rewards(long_r, long_m, scale), zero, long_m, 1.0, 1.0)
        ret_short, _ = core.gae(core.scale_token_rewards(short_r, short_m, scale), zero, short_m, 1.0, 1.0)
        # the decision point is token 3: what the answer earns from there on, going on against stopping
        assert ret_long[0, 2].item() == pytest.approx(cont) and ret_short[0, 2].item() == pytest.approx(stop)
    # prefix: tokens 3-4 get (1 - 4) / 3 = -1 and (1 - 3) / 4 = -0.5, summing to -1.5 = 2.5 - 4;
    # mean: they get 1 / 4 each, +0.5, though the answer's Eq. 1 falls by 1.5


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=1, max_size=12), st.integers(0, 4), st.integers(0, 3))
def test_prefix_rewards_sum_to_eq1_and_see_no_later_token(rs, pad, extra):
    """Summed, they are Eq. 1's mean over n_scored positions; token t's reward ignores every token after it."""
    n = len(rs)
    r = torch.tensor([rs + [7.0] * pad], dtype=torch.float64)
    m = torch.tensor([[1.0] * n + [0.0] * pad], dtype=torch.float64)
    n_scored = torch.tensor([n + extra])
    got = core.scale_token_rewards(r, m, "prefix", n_scored)
    assert math.isclose(float(got.sum()), sum(rs) / (n + extra), abs_tol=1e-9)
    assert float(got[0, n:].abs().sum()) == 0.0
    for k in range(n):  # change every token after k: rewards up to k stay
        r2 = r.clone()
        r2[0, k + 1:n] += 3.0
        again = core.scale_token_rewards(r2, m, "prefix", n_scored)
        assert torch.allclose(again[0, :k + 1], got[0, :k + 1])


def test_gae_by_hand():
    gamma, lam = 0.9, 0.5  # gamma * lam = 0.45
    rewards = t([[1.0, 0.0, 2.0], [0.0, 3.0, 9.0]])
    values = t([[0.5, 1.0, 1.5], [1.0, 2.0, 7.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    adv, ret = core.gae(rewards, values, mask, gamma, lam)
    # row 0: d2 = 2 + 0 - 1.5 = .5                      A2 = .5
    #        d1 = 0 + .9*1.5 - 1 = .35                  A1 = .35 + .45*.5 = .575
    #        d0 = 1 + .9*1 - .5 = 1.4                   A0 = 1.4 + .45*.575 = 1.65875
    # row 1 (last token at t=1; V after it is 0, padding ignored):
    #        d1 = 3 + 0 - 2 = 1                         A1 = 1
    #        d0 = 0 + .9*2 - 1 = .8                     A0 = .8 + .45*1 = 1.25
    assert torch.allclose(adv, t([[1.65875, 0.575, 0.5], [1.25, 1.0, 0.0]]))
    assert torch.allclose(ret, t([[2.15875, 1.575, 2.0], [2.25, 3.0, 0.0]]))


def test_gae_gamma1_lambda1_is_reward_to_go_minus_value():
    rewards, values, mask = t([[1.0, 2.0, 3.0]]), t([[0.5, 0.5, 0.5]]), t([[1, 1, 1]])
    adv, _ = core.gae(rewards, values, mask, 1.0, 1.0)
    assert torch.allclose(adv, t([[6 - 0.5, 5 - 0.5, 3 - 0.5]]))  # Monte-Carlo returns minus V


def test_policy_loss_by_hand():
    old = torch.zeros(1, 5)
    ratios = t([[1.5, 0.5, 0.5, 1.1, 7.0]])
    adv = t([[1.0, 1.0, -2.0, -1.0, 100.0]])
    mask = t([[1, 1, 1, 1, 0]])  # the 5th token is padding
    out = core.policy_loss(ratios.log(), old, adv, mask, cliprange=0.2)
    # token: unclipped -A*r, clipped -A*clip(r, .8, 1.2), loss = max
    #  1: -1.5 vs -1.2 -> -1.2 (clipped)   2: -.5 vs -.8 -> -.5
    #  3:  1.0 vs  1.6 ->  1.6 (clipped)   4: 1.1 vs 1.1 -> 1.1 (not counted as clipped)
    # mean = (-1.2 - .5 + 1.6 + 1.1) / 4 = .25 ; clipfrac = 2 / 4
    assert out.loss.item() == pytest.approx(0.25)
    assert out.clipfrac.item() == pytest.approx(0.5)
    lr = [math.log(1.5), math.log(0.5), math.log(0.5), math.log(1.1)]
    assert out.approx_kl.item() == pytest.approx(0.5 * sum(x * x for x in lr) / 4)


def test_policy_loss_gradient_is_zero_where_clipped():
    logp = torch.log(t([[1.5, 0.9]])).requires_grad_()
    out = core.policy_loss(logp, torch.zeros(1, 2), t([[1.0, 1.0]]), t([[1, 1]]), 0.2)
    out.loss.backward()
    # token 1 clipped (constant -1.2): no gradient; token 2: d(-r)/dlogp / 2 = -0.9 / 2
    assert torch.allclose(logp.grad, t([[0.0, -0.45]]))


def test_value_loss_by_hand():
    v, old, ret, m = t([[1.0, 3.0, 5.0]]), t([[0.5, 2.0, 0.0]]), t([[2.0, 2.0, 0.0]]), t([[1, 1, 0]])
    loss, clipfrac = core.value_loss(v, old, ret, m, 0.2)
    # token 1: (1-2)^2 = 1 ; clipped V = .5 + clip(.5) = .7 -> (.7-2)^2 = 1.69 ; max 1.69 (clipped)
    # token 2: (3-2)^2 = 1 ; clipped V = 2 + .2 = 2.2 -> .04 ; max 1
    # loss = .5 * (1.69 + 1) / 2 = .6725
    assert loss.item() == pytest.approx(0.6725)
    assert clipfrac.item() == pytest.approx(0.5)
    plain, _ = core.value_loss(v, old, ret, m, None)
    assert plain.item() == pytest.approx(0.5 * (1 + 1) / 2)


def test_explained_variance():
    ret, m = t([[1.0, 2.0, 3.0, 50.0]]), t([[1, 1, 1, 0]])
    assert core.explained_variance(ret.clone(), ret, m).item() == pytest.approx(1.0)
    # V = 2 everywhere: Var[G - V] = Var[G] -> 0
    assert core.explained_variance(torch.full_like(ret, 2.0), ret, m).item() == pytest.approx(0.0)


def test_kl_controllers():
    fixed = core.FixedKLController(0.05)
    fixed.update(100.0, 64)
    assert fixed.value == 0.05
    ctl = core.AdaptiveKLController(0.1, target=6.0, horizon=100)
    ctl.update(9.0, 10)  # error = clip(9/6 - 1, +-.2) = .2 -> beta * (1 + .2 * 10 / 100) = .102
    assert ctl.value == pytest.approx(0.102)
    ctl.update(5.4, 10)  # error = -.1 -> .102 * .99
    assert ctl.value == pytest.approx(0.102 * 0.99)
    other = core.AdaptiveKLController(1.0, 6.0, 100)
    other.load_state_dict(ctl.state_dict())
    assert other.value == ctl.value


def test_running_moments_match_batch_statistics():
    rm = core.RunningMoments()
    rm.update(t([1.0, 2.0, 3.0]))
    rm.update(t([4.0, 5.0]))
    # all five: mean 3, population variance (4+1+0+1+4)/5 = 2
    assert rm.mean == pytest.approx(3.0) and rm.var == pytest.approx(2.0) and rm.count == 5
    assert torch.allclose(rm.normalise(t([3.0 + 2 ** 0.5])), t([1.0]))
    assert torch.allclose(rm.scale(t([2 ** 0.5])), t([1.0]))


def test_config_defaults_and_validation():
    from finegrain.config import build_config
    from finegrain.errors import ConfigError
    from finegrain.ppo.config import PPOConfig

    base = dict(policy="p", reward_model="r", reward_mode="token", prompts="x.jsonl", output="o")
    cfg = build_config(PPOConfig, base)
    # Huang et al. (2024) defaults; the token mode's KL and scale come from the sandbox sweep
    assert (cfg.gamma, cfg.lam, cfg.cliprange, cfg.cliprange_value, cfg.vf_coef) == (1.0, 0.95, 0.2, 0.2, 0.1)
    assert (cfg.kl_coef, cfg.initial_kl_coef(), cfg.token_reward_scale) == (None, 1.0, "mean")
    assert build_config(PPOConfig, {**base, "reward_mode": "sequence"}).initial_kl_coef() == 0.05
    assert build_config(PPOConfig, {**base, "kl_coef": 0.0}).initial_kl_coef() == 0.0  # the paper's literal form
    assert cfg.minibatch_size() == 4 and cfg.mini_batch_size is None  # derived, never written back
    for bad in ({"batch_size": 10, "mini_batch_size": 4}, {"temperature": 0.0}, {"steps": 0},
                {"mini_batch_size": 4, "grad_accum": 3}):
        with pytest.raises(ConfigError):
            build_config(PPOConfig, {**base, **bad})
    with pytest.raises(ConfigError, match="--reward-mode"):
        build_config(PPOConfig, {**base, "reward_mode": "tokens"})
