"""Reward-model scoring for PPO: same-tokenizer ids, cross-tokenizer offset mapping (sum preserved),
sequence scores at the true last position, and the token mode with a reward on the last token
only reproducing the sequence-mode update exactly."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from finegrain.scratch import train_bpe_tokenizer
from finegrain.ppo.rewards import (RewardOutput, RewardScorer, map_rewards_by_offsets, map_same_tokenizer,
                                   policy_token_offsets, tokenizers_match)
from finegrain.rm.inputs import build_rm_example, rm_example_from_ids
from finegrain.rm.scorer import rm_forward
from test_ppo_train import tiny, word_tokenizer

from conftest import CORPUS, make_tiny_model


# ----------------------------------------------------------------------------- offset mapping
def test_map_rewards_proportional_split_by_hand():
    # RM tokens: "abcd" (0,4) r=2 ; "ef" (4,6) r=1 ; closing (6,6) r=0.5
    # policy tokens: "a" (0,1), "bcdef" (1,6), EOS (6,6)
    out = map_rewards_by_offsets([(0, 4), (4, 6), (6, 6)], [2.0, 1.0, 0.5], [(0, 1), (1, 6), (6, 6)])
    # "abcd" overlaps "a" by 1 and "bcdef" by 3: 2 * 1/4 = .5 and 2 * 3/4 = 1.5 ; "ef" all to "bcdef"
    # the zero-width closing token goes to the last policy token (the EOS)
    assert out == pytest.approx([0.5, 2.5, 0.5])


@st.composite
def two_tokenisations(draw):
    n = draw(st.integers(1, 60))
    def cuts():
        inner = draw(st.lists(st.integers(1, max(1, n - 1)), max_size=12, unique=True)) if n > 1 else []
        pts = [0] + sorted(inner) + [n]
        spans = [(a, b) for a, b in zip(pts, pts[1:]) if b > a]
        if draw(st.booleans()):  # a zero-width closing token, like EOS
            spans.append((n, n))
        return spans
    src, dst = cuts(), cuts()
    rewards = draw(st.lists(st.floats(-10, 10, allow_nan=False), min_size=len(src), max_size=len(src)))
    return src, rewards, dst


@settings(max_examples=200, deadline=None)
@given(two_tokenisations())
def test_map_rewards_preserves_sum(case):
    src, rewards, dst = case
    out = map_rewards_by_offsets(src, rewards, dst)
    assert len(out) == len(dst)
    assert sum(out) == pytest.approx(sum(rewards), abs=1e-9)


def test_policy_token_offsets_tile_the_text():
    tok = train_bpe_tokenizer(CORPUS * 5, vocab_size=300)
    text = "Café ☃ is safe, never mix bleach."
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    offs = policy_token_offsets(tok, ids, text)
    assert len(offs) == len(ids) and offs[0][0] == 0 and offs[-1] == (len(text), len(text))  # EOS: zero width
    assert all(a[1] == b[0] for a, b in zip(offs, offs[1:]))  # contiguous
    assert "".join(text[s:e] for s, e in offs) == text


# ----------------------------------------------------------------------------- same tokenizer
def test_ids_layout_equals_build_rm_example(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt, response = "How tall is Mount Everest?", "About 8,849 metres."
    ref = build_rm_example(tok, prompt, response, max_length=64)
    from finegrain.tokens import format_prompt

    q = tok(format_prompt(tok, prompt), add_special_tokens=False)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"]
    ours = rm_example_from_ids(q, r, tok.eos_token_id, 64)
    assert (ours.input_ids, ours.response_start, ours.response_end) == (ref.input_ids, ref.response_start,
                                                                       ref.response_end)
    short = build_rm_example(tok, prompt, response, max_length=8)  # same truncation policy
    assert rm_example_from_ids(q, r, tok.eos_token_id, 8).input_ids == short.input_ids
    for width in (64, 12):  # the echo view: the response twice, scored on the second copy, cut alike
        ref = build_rm_example(tok, prompt, response, max_length=width, view="echo")
        ours = rm_example_from_ids(q, r, tok.eos_token_id, width, "echo")
        assert (ours.input_ids, ours.response_start, ours.response_end) == (ref.input_ids, ref.response_start,
                                                                           ref.response_end)
        assert ours.response_ids == ours.input_ids[len(ours.input_ids) - len(ours.response_ids):]


def test_map_same_tokenizer():
    # ended response: RM positions = body + closing, policy tokens = body + EOS -> identity
    assert map_same_tokenizer([1.0, 2.0, 3.0], 3) == [1.0, 2.0, 3.0]
    # no EOS sampled: RM has one more position (its closing EOS); it joins the last policy token
    assert map_same_tokenizer([1.0, 2.0, 3.0], 2) == [1.0, 5.0]


def test_sequence_rm_scores_the_closing_eos_even_when_pad_is_eos():
    tok = train_bpe_tokenizer(CORPUS * 5, vocab_size=300, pad=None)  # pad == eos
    assert tok.pad_token_id == tok.eos_token_id
    rm = make_tiny_model(tok, "sequence", seed=2).eval()
    exs = [build_rm_example(tok, "Be polite.", text, max_length=64) for text in ("Sure.", "I am sorry, but no.")]
    scores = rm_forward(rm, tok, exs, "sequence", batch_size=2)
    for ex, s in zip(exs, scores):
        ids = torch.tensor([ex.input_ids])
        with torch.no_grad():
            hidden = rm.transformer(ids).last_hidden_state
            expected = rm.score(hidden)[0, -1, 0]  # the head at the closing EOS, no padding at all
        assert s.item() == pytest.approx(expected.item(), abs=1e-5)


# ----------------------------------------------------------------------------- the scorer
def _fake_generation(tok, texts, end):
    from finegrain.tokens import right_pad

    rows = []
    for t, e in zip(texts, end):
        ids = tok(t, add_special_tokens=False)["input_ids"]
        rows.append(ids + ([tok.eos_token_id] if e else []))
    ids, mask = right_pad(rows, tok.pad_token_id)
    return ids, mask


def test_same_tokenizer_token_rewards_are_the_rm_rewards(tiny_tokenizer):
    tok = tiny_tokenizer
    rm = make_tiny_model(tok, "token", seed=4).eval()
    prompts, texts = ["Be polite.", "List fruit."], ["Sure, here it is.", "apples, bananas"]
    q = [tok(p + "\n", add_special_tokens=False)["input_ids"] for p in prompts]
    r_ids, r_mask = _fake_generation(tok, texts, [True, False])
    scorer = RewardScorer(rm, tok, "token", tok, max_length=64)
    assert scorer.same_tokenizer
    out = scorer.score(prompts, q, r_ids, r_mask, texts)
    raw = rm_forward(rm, tok, [build_rm_example(tok, p, t, max_length=64) for p, t in zip(prompts, texts)], "token", 4)
    for b in range(2):
        n = int(r_mask[b].sum())
        expected = map_same_tokenizer(raw[b].tolist(), n)
        assert torch.allclose(out.token_rewards[b, :n], torch.tensor(expected), atol=1e-5)
        assert (out.token_rewards[b, n:] == 0).all()
        assert out.scores[b].item() == pytest.approx(raw[b].mean().item(), abs=1e-5)  # Eq. 1
        assert int(out.n_scored[b]) == len(raw[b])


def test_a_response_ended_by_another_stop_token_is_scored_as_if_it_ended_with_eos(tiny_tokenizer):
    """A chat model's end-of-turn token (generation_config.eos_token_id) ends a response: the RM sees its own EOS
    in that place, as in the pairs it learnt from, not the end-of-turn token followed by EOS."""
    tok = tiny_tokenizer
    rm = make_tiny_model(tok, "token", seed=4).eval()
    prompts, texts = ["Be polite.", "List fruit."], ["Sure, here it is.", "apples, bananas"]
    q = [tok(p + "\n", add_special_tokens=False)["input_ids"] for p in prompts]
    r_ids, r_mask = _fake_generation(tok, texts, [True, True])
    end_of_turn = 7  # any id that is not the tokenizer's EOS
    assert end_of_turn != tok.eos_token_id
    turn_ids = r_ids.clone()
    turn_ids[r_ids == tok.eos_token_id] = end_of_turn
    expected = RewardScorer(rm, tok, "token", tok, max_length=64).score(prompts, q, r_ids, r_mask, texts)
    scorer = RewardScorer(rm, tok, "token", tok, max_length=64, stop_ids=[tok.eos_token_id, end_of_turn])
    out = scorer.score(prompts, q, turn_ids, r_mask, texts)
    assert torch.equal(out.scores, expected.scores) and torch.equal(out.token_rewards, expected.token_rewards)
    assert torch.equal(out.n_scored, expected.n_scored)
    unaware = RewardScorer(rm, tok, "token", tok, max_length=64).score(prompts, q, turn_ids, r_mask, texts)
    assert (unaware.n_scored == expected.n_scored + 1).all()  # without the stop ids: one token more, EOS appended


def test_cross_tokenizer_preserves_each_responses_reward_sum(tiny_tokenizer):
    pol_tok = tiny_tokenizer
    rm_tok = train_bpe_tokenizer(CORPUS * 5, vocab_size=290)  # another vocabulary
    assert not tokenizers_match(pol_tok, rm_tok)
    rm = make_tiny_model(rm_tok, "token", seed=5).eval()
    prompts = ["Be polite.", "How tall?", "Fruit?"]
    texts = ["Sure, I am sorry.", "About 8,849 metres above sea level.", "apples ☃ bananas"]
    q = [pol_tok(p + "\n", add_special_tokens=False)["input_ids"] for p in prompts]
    r_ids, r_mask = _fake_generation(pol_tok, texts, [True, False, True])
    scorer = RewardScorer(rm, rm_tok, "token", pol_tok, max_length=64)
    out = scorer.score(prompts, q, r_ids, r_mask, texts)
    for b in range(3):
        rm_sum = out.scores[b] * out.n_scored[b]  # Eq. 1 mean x T = sum of the RM's r_t
        assert out.token_rewards[b].sum().item() == pytest.approx(rm_sum.item(), abs=1e-4)
        n = int(r_mask[b].sum())
        assert (out.token_rewards[b, n:] == 0).all()
    seq = RewardScorer(make_tiny_model(rm_tok, "sequence", seed=5).eval(), rm_tok, "sequence", pol_tok,
                       max_length=64).score(prompts, q, r_ids, r_mask, texts)
    assert seq.token_rewards is None and seq.scores.shape == (3,)


# ----------------------------------------------------------------------------- token mode == sequence mode
def _rollout_and_models(prompts=("say many x", "please a b", "say c", "x x x"), cut_responses_at=None):
    from finegrain.generation import sample
    from finegrain.ppo.rollout import PolicyAndValue, make_rollout, score_rollout_forward

    tok = word_tokenizer()
    policy, value = tiny(tok, "causal", 1), tiny(tok, "token", 2)
    model = PolicyAndValue(policy, value)
    ref = copy.deepcopy(policy)
    prompts = list(prompts)
    q = [tok(p + " :", add_special_tokens=False)["input_ids"] for p in prompts]
    gen = sample(policy, tok, q, max_new_tokens=5, temperature=1.0, generator_seed=3)
    if cut_responses_at:  # as if these responses had ended after n tokens
        gen.response_mask, gen.response_ids = gen.response_mask.clone(), gen.response_ids.clone()
        for row, n in cut_responses_at.items():
            gen.response_mask[row, n:] = 0
            gen.response_ids[row, n:] = tok.pad_token_id
    fwd = score_rollout_forward(model, ref, None, gen.query_ids, gen.query_mask, gen.response_ids,
                                gen.response_mask, 1.0, 4, "cpu")
    scores = torch.tensor([0.7, -1.2, 2.0, 0.1])
    r = make_rollout(prompts, q, gen, fwd, RewardOutput(scores, None, gen.response_mask.sum(-1) + 1))
    return tok, model, r, scores


def test_token_mode_with_reward_on_last_token_gives_the_sequence_update():
    from accelerate import Accelerator

    from finegrain.config import build_config
    from finegrain.ppo.config import PPOConfig
    from finegrain.ppo.rollout import RewardSettings, process_rewards
    from finegrain.ppo.train import ppo_update

    tok, model, r, scores = _rollout_and_models()
    last = r.response_mask.sum(-1) - 1
    token = torch.zeros_like(r.logprobs)
    token[torch.arange(4), last] = scores
    n_scored = r.response_mask.sum(-1) + 1
    seq_out = RewardOutput(scores, None, n_scored)
    tok_out = RewardOutput(scores, token, n_scored)
    settings = {m: RewardSettings(m, "k1", "raw", None, 1.0, False, 1.0, 0.95, True) for m in ("sequence", "token")}
    a = process_rewards(r, seq_out, 0.05, settings["sequence"]).tensors_out_of_inference_mode()
    b = process_rewards(r, tok_out, 0.05, settings["token"]).tensors_out_of_inference_mode()
    assert torch.equal(a.rewards, b.rewards) and torch.equal(a.advantages, b.advantages)
    assert torch.equal(a.returns, b.returns)

    cfg = build_config(PPOConfig, dict(policy="p", reward_model="r", reward_mode="token", prompts="x", output="o",
                                       batch_size=4, num_minibatches=2, ppo_epochs=2, lr=1e-2, temperature=1.0))
    acc = Accelerator(cpu=True)
    results = []
    for rollout in (a, b):
        m = copy.deepcopy(model)
        opt = torch.optim.AdamW(m.parameters(), lr=cfg.lr, eps=cfg.adam_eps)
        stats = ppo_update(acc, m, opt, rollout, cfg, step=0)
        results.append((stats, m.state_dict()))
    (sa, pa), (sb, pb) = results
    assert sa == sb
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert any(not torch.equal(pa[k], model.state_dict()[k]) for k in pa)  # and the step did change weights


def test_logprobs_do_not_depend_on_padding():
    """Left-padded queries + right-padded responses give each row the log-probs it has alone."""
    from finegrain.tokens import left_pad, right_pad
    from finegrain.ppo.rollout import policy_logprobs

    tok = word_tokenizer()
    policy = tiny(tok, "causal", 7)
    queries = [[3, 4, 5, 6, 7], [8]]
    responses = [[9, 10], [11, 12, 13, 0]]
    q, qm = left_pad(queries, tok.pad_token_id)
    r, rm = right_pad(responses, tok.pad_token_id)
    with torch.no_grad():
        batch = policy_logprobs(policy, q, qm, r, rm, temperature=0.7)
        for i in range(2):
            alone = policy_logprobs(policy, torch.tensor([queries[i]]), torch.ones(1, len(queries[i]), dtype=torch.long),
                                    torch.tensor([responses[i]]), torch.ones(1, len(responses[i]), dtype=torch.long),
                                    temperature=0.7)
            n = len(responses[i])
            assert torch.allclose(batch[i, :n], alone[0], atol=1e-5)


# ----------------------------------------------------------------------------- minibatch padding trim
def _synthetic_rollout(q_lens: list[int], r_lens: list[int], Lq: int, Lr: int):
    """Left-padded queries and right-padded responses of the given lengths; every per-token field distinct."""
    from finegrain.ppo.rollout import Rollout

    B = len(q_lens)
    q_mask = torch.stack([torch.arange(Lq) >= Lq - n for n in q_lens]).long()
    r_mask = torch.stack([torch.arange(Lr) < n for n in r_lens]).long()
    q_ids = torch.where(q_mask.bool(), torch.arange(B * Lq).view(B, Lq) + 10, torch.zeros(B, Lq, dtype=torch.long))
    r_ids = torch.where(r_mask.bool(), torch.arange(B * Lr).view(B, Lr) + 1000, torch.zeros(B, Lr, dtype=torch.long))
    per_token = {name: torch.randn(B, Lr) for name in Rollout.PER_TOKEN if name not in ("response_ids", "response_mask")}
    return Rollout(prompts=[f"p{i}" for i in range(B)], texts=[f"t{i}" for i in range(B)], query_ids=q_ids,
                   query_mask=q_mask, response_ids=r_ids, response_mask=r_mask, ended=torch.ones(B, dtype=torch.bool),
                   scores=torch.randn(B), **per_token)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_minibatch_trim_keeps_every_real_token_and_drops_only_padding(data):
    from finegrain.ppo.rollout import Rollout

    B = data.draw(st.integers(1, 6))
    Lq, Lr = data.draw(st.integers(1, 9)), data.draw(st.integers(1, 9))
    q_lens = data.draw(st.lists(st.integers(1, Lq), min_size=B, max_size=B))
    r_lens = data.draw(st.lists(st.integers(1, Lr), min_size=B, max_size=B))
    r = _synthetic_rollout(q_lens, r_lens, Lq, Lr)
    idx = torch.tensor(data.draw(st.lists(st.integers(0, B - 1), min_size=1, max_size=B, unique=True)))
    full, cut = r.select(idx, "cpu", trim=False), r.select(idx, "cpu")
    q_max, r_max = max(q_lens[i] for i in idx), max(r_lens[i] for i in idx)
    assert cut.query_ids.shape == (len(idx), q_max) and cut.response_ids.shape == (len(idx), r_max)
    # what was dropped is padding in every selected row; what is kept is the full tensor's tail / head
    assert full.query_mask[:, :Lq - q_max].sum() == 0 and full.response_mask[:, r_max:].sum() == 0
    assert torch.equal(cut.query_ids, full.query_ids[:, Lq - q_max:])
    assert torch.equal(cut.query_mask, full.query_mask[:, Lq - q_max:])
    for name in Rollout.PER_TOKEN:
        assert torch.equal(getattr(cut, name), getattr(full, name)[:, :r_max]), name
    assert torch.equal(cut.scores, full.scores) and cut.prompts == full.prompts
    # every real token survives, in order
    for i in range(len(idx)):
        assert torch.equal(cut.query_ids[i][cut.query_mask[i].bool()], full.query_ids[i][full.query_mask[i].bool()])
        assert torch.equal(cut.response_ids[i][cut.response_mask[i].bool()],
                           full.response_ids[i][full.response_mask[i].bool()])


def test_trimmed_minibatch_gives_the_same_loss_and_gradients():
    from finegrain.config import build_config
    from finegrain.ppo.config import PPOConfig
    from finegrain.ppo.rollout import RewardSettings, process_rewards
    from finegrain.ppo.train import ppo_minibatch_loss

    # rows 0 and 2: the shortest prompts, and responses cut short, so that both ends get trimmed
    tok, model, r, scores = _rollout_and_models(("say c", "please a b say many x", "x", "x x x"), {0: 2, 2: 3})
    settings_ = RewardSettings("sequence", "k1", "raw", None, 1.0, False, 1.0, 0.95, True)
    r = process_rewards(r, RewardOutput(scores, None, r.response_mask.sum(-1) + 1), 0.05,
                        settings_).tensors_out_of_inference_mode()
    idx = torch.tensor([2, 0])
    cfg = build_config(PPOConfig, dict(policy="p", reward_model="r", reward_mode="sequence", prompts="x", output="o",
                                       batch_size=4))
    full, cut = r.select(idx, "cpu", trim=False), r.select(idx, "cpu")
    assert cut.query_ids.shape[1] < full.query_ids.shape[1] and cut.response_ids.shape == (2, 3)
    grads = []
    for b in (full, cut):
        model.zero_grad()
        loss, stats = ppo_minibatch_loss(model, b, cfg)
        loss.backward()
        grads.append((loss.detach(), stats, {n: p.grad.clone() for n, p in model.named_parameters()
                                             if p.grad is not None}))
    (la, sa, ga), (lb, sb, gb) = grads
    assert torch.allclose(la, lb, atol=1e-6) and sa.keys() == sb.keys()
    assert all(abs(sa[k] - sb[k]) < 1e-5 for k in sa)
    assert ga.keys() == gb.keys() and all(torch.allclose(ga[k], gb[k], atol=1e-6) for k in ga)


# ----------------------------------------------------------------------------- --reward-norm in token mode
@pytest.mark.parametrize("scale", ["raw", "mean"])
def test_reward_norm_gives_token_mode_totals_unit_std_at_either_scale(scale):
    """Hand numbers: 2 responses of 2 policy tokens, r_t = (1, 3) and (-1, -1), T of Eq. 1 = 2 for both.

    raw: totals 4 and -2, mean 1, population std 3 -> r_t / 3, totals 4/3 and -2/3 (std 1).
    mean: Eq. 1 means 2 and -1, mean 0.5, std 1.5 -> r_t / 1.5 / 2, totals 2/1.5 and -1/1.5 (std 1).
    Before the fix the moments tracked the raw totals at the mean scale too: totals of std 1/2.
    """
    from finegrain.ppo import core
    from finegrain.ppo.rollout import RewardSettings, Rollout, process_rewards, reward_statistic

    tr = torch.tensor([[1.0, 3.0], [-1.0, -1.0]])
    n_scored = torch.tensor([2, 2])
    out = RewardOutput(tr.sum(-1) / n_scored, tr, n_scored)
    s = RewardSettings("token", "k1", scale, None, None, False, 1.0, 0.95, False)
    moments = core.RunningMoments()
    moments.update(reward_statistic(out, s))
    expected_std = {"raw": 3.0, "mean": 1.5}[scale]
    assert moments.std == pytest.approx(expected_std)
    zeros = torch.zeros(2, 2)
    r = Rollout(["a", "b"], ["x", "y"], torch.ones(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.long),
                torch.ones(2, 2, dtype=torch.long), torch.ones(2, 2, dtype=torch.long), torch.ones(2, dtype=torch.bool),
                zeros, zeros, zeros, zeros, out.scores)
    got = process_rewards(r, out, 0.0, s, moments)
    totals = got.token_rewards.sum(-1)
    want = {"raw": [4 / 3, -2 / 3], "mean": [2 / 1.5, -1 / 1.5]}[scale]
    assert totals.tolist() == pytest.approx(want)
    assert totals.var(unbiased=False).sqrt().item() == pytest.approx(1.0)
