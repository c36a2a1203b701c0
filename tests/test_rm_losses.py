"""The three RM losses against hand-computed numbers (reference/paper.md Eq. 1-4)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from finegrain.rm.losses import (mean_reward, sequence_loss, token_edit_loss, token_edit_margin, token_mean_loss,
                                 token_mean_margin)

T = torch.tensor


def test_sequence_loss_hand_computed():
    # margins [2-1, 0-1] = [1, -1]: (log(1+e^-1) + log(1+e^1)) / 2 = (0.3132617 + 1.3132617) / 2
    loss = sequence_loss(T([2.0, 0.0]), T([1.0, 1.0]))
    assert loss.item() == pytest.approx(0.8132616875, abs=1e-7)
    assert sequence_loss(T([0.0]), T([0.0])).item() == pytest.approx(math.log(2), abs=1e-7)


def test_mean_reward_is_eq1_over_the_mask():
    r = T([[9.0, 1.0, 2.0, 3.0, 7.0]])
    m = T([[0, 1, 1, 1, 0]])
    assert mean_reward(r, m).tolist() == [2.0]  # (1 + 2 + 3) / 3; prompt and pad ignored


def test_token_mean_loss_hand_computed():
    # better: positions 1..3 are the response (T=3): mean (1+2+3)/3 = 2; worse: T=2, mean (0+1)/2 = 0.5
    rb, mb = T([[5.0, 1.0, 2.0, 3.0]]), T([[0, 1, 1, 1]])
    rw, mw = T([[5.0, 0.0, 1.0]]), T([[0, 1, 1]])
    assert token_mean_margin(rb, mb, rw, mw).tolist() == [1.5]
    # -log sigma(1.5) = log(1 + e^-1.5)
    assert token_mean_loss(rb, mb, rw, mw).item() == pytest.approx(0.2014132780, abs=1e-7)


def test_token_edit_loss_hand_computed():
    # better: T_i = 4 (positions 1..4), U1 = {2}: 4 / 4 = 1
    rb = T([[0.0, 1.0, 4.0, -2.0, 0.5]])
    mb, ub = T([[0, 1, 1, 1, 1]]), T([[0, 0, 1, 0, 0]])
    # worse: T_j = 5 (positions 1..5), U1 = {2, 3}: (-3 - 1) / 5 = -0.8  -> margin 1.8
    rw = T([[0.0, 1.0, -3.0, -1.0, 0.5, 0.2]])
    mw, uw = T([[0, 1, 1, 1, 1, 1]]), T([[0, 0, 1, 1, 0, 0]])
    assert token_edit_margin(rb, mb, ub, rw, mw, uw).item() == pytest.approx(1.8, abs=1e-6)
    assert token_edit_loss(rb, mb, ub, rw, mw, uw).item() == pytest.approx(0.1529776105, abs=1e-7)


def test_token_edit_divides_by_full_length_not_u1_count():
    r = T([[2.0, 0.0, 0.0, 0.0]])
    m, u = T([[1, 1, 1, 1]]), T([[1, 0, 0, 0]])
    zero = T([[0.0]])
    margin = token_edit_margin(r, m, u, zero, T([[1]]), T([[0]]))
    assert margin.item() == pytest.approx(0.5)  # 2 / T=4, not 2 / |U1|=1


def test_token_edit_gradient_is_exactly_zero_on_u0_and_hand_computed_on_u1():
    rb = T([[0.0, 1.0, 4.0, -2.0, 0.5]], requires_grad=True)
    rw = T([[0.0, 1.0, -3.0, -1.0, 0.5, 0.2]], requires_grad=True)
    mb, ub = T([[0, 1, 1, 1, 1]]), T([[0, 0, 1, 0, 0]])
    mw, uw = T([[0, 1, 1, 1, 1, 1]]), T([[0, 0, 1, 1, 0, 0]])
    token_edit_loss(rb, mb, ub, rw, mw, uw).backward()
    assert torch.all(rb.grad[ub == 0] == 0) and torch.all(rw.grad[uw == 0] == 0)
    s = 0.1418510649  # 1 - sigma(1.8)
    assert rb.grad[0, 2].item() == pytest.approx(-s / 4, abs=1e-7)   # raise edited tokens
    assert rw.grad[0, 2].item() == pytest.approx(s / 5, abs=1e-7)    # lower replaced tokens
    assert rw.grad[0, 3].item() == pytest.approx(s / 5, abs=1e-7)


def test_losses_are_means_over_the_batch():
    rb = T([[1.0, 2.0], [0.0, -1.0]])
    rw = T([[0.0, 0.0], [3.0, 1.0]])
    m = T([[1, 1], [1, 1]])
    u = T([[1, 0], [0, 1]])
    each = [token_mean_loss(rb[i:i + 1], m[i:i + 1], rw[i:i + 1], m[i:i + 1]) for i in range(2)]
    assert token_mean_loss(rb, m, rw, m).item() == pytest.approx(sum(e.item() for e in each) / 2)
    each = [token_edit_loss(rb[i:i + 1], m[i:i + 1], u[i:i + 1], rw[i:i + 1], m[i:i + 1], u[i:i + 1]) for i in range(2)]
    assert token_edit_loss(rb, m, u, rw, m, u).item() == pytest.approx(sum(e.item() for e in each) / 2)


floats = st.floats(-5, 5, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(st.lists(floats, min_size=0, max_size=6), st.lists(floats, min_size=1, max_size=4),
       st.lists(floats, min_size=1, max_size=4), st.integers(0, 6))
def test_token_mean_equals_eq3_when_u0_rewards_agree(u0, u1_i, u1_j, cut):
    """Eq. 1-2 margin == Eq. 3's written form when each U0 token has the same reward on both sides."""
    cut = min(cut, len(u0))
    better = u0[:cut] + u1_i + u0[cut:]   # the edit replaces a block in the middle
    worse = u0[:cut] + u1_j + u0[cut:]
    ti, tj = len(better), len(worse)
    eq3 = (1 / ti - 1 / tj) * sum(u0) + sum(u1_i) / ti - sum(u1_j) / tj
    m = token_mean_margin(T([better]), torch.ones(1, ti), T([worse]), torch.ones(1, tj)).item()
    assert m == pytest.approx(eq3, abs=1e-4)
    # Eq. 4 keeps only the U1 terms; it equals Eq. 3 exactly when the lengths agree
    ub = T([[0] * cut + [1] * len(u1_i) + [0] * (len(u0) - cut)])
    uw = T([[0] * cut + [1] * len(u1_j) + [0] * (len(u0) - cut)])
    e4 = token_edit_margin(T([better]), torch.ones(1, ti), ub, T([worse]), torch.ones(1, tj), uw).item()
    assert e4 == pytest.approx(sum(u1_i) / ti - sum(u1_j) / tj, abs=1e-4)
    if ti == tj:
        assert e4 == pytest.approx(eq3, abs=1e-4)


def test_u0_consistency_hand_computed_and_aligned_pairs():
    from finegrain.rm.align import align_tokens
    from finegrain.rm.data import u0_pairs
    from finegrain.rm.losses import u0_consistency

    # original [5, 6, 7, 0], edited [5, 9, 9, 7, 0]: equal blocks 5 and (7, 0)
    al = align_tokens([5, 6, 7, 0], [5, 9, 9, 7, 0])
    assert u0_pairs(al.opcodes) == [(0, 0), (3, 2), (4, 3)]   # (edited position, original position)
    rb = T([[1.0, 0.0, 0.0, 2.0, 0.5], [0.0, 0.0, 0.0, 0.0, 0.0]])
    rw = T([[0.0, 9.0, 2.0, 1.5], [3.0, 0.0, 0.0, 0.0]])
    ib, iw = T([[0, 3, 4], [0, 0, 0]]), T([[0, 2, 3], [0, 0, 0]])
    m = T([[1, 1, 1], [1, 0, 0]])
    # gaps: 1-0, 2-2, 0.5-1.5, 0-3 -> squares 1, 0, 1, 9 over 4 pairs
    assert u0_consistency(rb, ib, rw, iw, m).item() == pytest.approx(11 / 4)


def test_edit_token_labels_and_label_loss_hand_computed():
    from finegrain.rm.losses import edit_token_labels, token_label_loss

    # row 0 better (response = positions 0-1, U1 = 1), row 1 worse (positions 0-2, U1 = 0)
    rewards = T([[0.0, 2.0, 9.0], [-1.0, 1.0, 0.0]])
    resp, u1 = T([[1, 1, 0], [1, 1, 1]]), T([[0, 1, 0], [1, 0, 0]])
    targets, weights = edit_token_labels(resp, u1, 1, 1.0)     # U0 = good
    assert targets.tolist() == [[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]] and weights.tolist() == [[1, 1, 0], [1, 1, 1]]
    # BCE(x, y) = log(1 + e^x) - x y: log 2 + log(1+e^-2) + log(1+e^-1) + log(1+e^-1) + log 2, over 5 tokens
    assert token_label_loss(rewards, targets, weights).item() == pytest.approx(2.1397459 / 5, abs=1e-6)
    targets, weights = edit_token_labels(resp, u1, 1, 0.5)     # U0 = neutral: x=1, y=.5 -> log(1+e) - .5
    assert targets.tolist() == [[0.5, 1.0, 0.0], [0.0, 0.5, 0.5]]
    assert token_label_loss(rewards, targets, weights).item() == pytest.approx(2.6397459 / 5, abs=1e-6)
    targets, weights = edit_token_labels(resp, u1, 1, None)    # U0 unlabelled: the two U1 tokens only
    assert weights.tolist() == [[0, 1, 0], [1, 0, 0]]
    assert token_label_loss(rewards, targets, weights).item() == pytest.approx((0.1269280 + 0.3132617) / 2, abs=1e-6)
    # the position outside the response (reward 9) gets no gradient
    r = rewards.clone().requires_grad_(True)
    token_label_loss(r, *edit_token_labels(resp, u1, 1, 1.0)).backward()
    assert r.grad[0, 2].item() == 0.0
    # d/dx = (sigmoid(x) - y) / 5 on the worse U1 token (x=-1, y=0)
    assert r.grad[1, 0].item() == pytest.approx(torch.sigmoid(T(-1.0)).item() / 5, abs=1e-7)
