"""The one reward-model forward (rm/scorer.py): eval-rm, show-rewards and PPO read the same rewards,
and its pad rule puts a sequence RM's score on the closing token whatever the tokenizer's pad."""
from __future__ import annotations

import pytest
import torch

from conftest import CORPUS, make_tiny_model
from finegrain.data.schema import Comparison
from finegrain.eval.show import _views
from finegrain.scratch import train_bpe_tokenizer
from finegrain.ppo.rewards import RewardScorer
from finegrain.rm.evaluate import _run
from finegrain.rm.model import RewardModel
from finegrain.rm.scorer import batch_pad_id, rm_forward
from finegrain.tokens import right_pad

PROMPTS = ["Be polite.", "List fruit.", "How tall is it?", "Where?"]
BETTER = ["Sure, here it is.", "apples, bananas and cherries", "About 8,849 metres above sea level.", "In Paris."]
WORSE = ["No.", "apples, never mix bleach", "About 8 metres.", "In a city far away from here."]


def _ppo(rm: RewardModel, texts: list[str]):
    """PPO's scores and per-token rewards of ``texts`` as ended responses of a policy sharing the RM's tokenizer."""
    tok = rm.tokenizer
    queries = [tok(p + "\n", add_special_tokens=False)["input_ids"] for p in PROMPTS]
    rows = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    ids, mask = right_pad(rows, tok.eos_token_id)
    scorer = RewardScorer(rm.model, tok, rm.kind, tok, max_length=rm.max_length, batch_size=len(texts), view=rm.view)
    assert scorer.same_tokenizer  # the policy's ids, not re-tokenised text
    out = scorer.score(PROMPTS, queries, ids, mask, texts)
    tokens = None if out.token_rewards is None else [out.token_rewards[b, :len(r)].tolist() for b, r in enumerate(rows)]
    return out.scores.tolist(), tokens


@pytest.mark.parametrize("pad", ["own", "eos"])
@pytest.mark.parametrize("kind,view", [("token", "causal"), ("token", "echo"), ("sequence", "causal")])
def test_eval_rm_show_rewards_and_ppo_read_identical_rewards(pad, kind, view):
    tok = train_bpe_tokenizer(CORPUS * 5, vocab_size=300, **({"pad": None} if pad == "eos" else {}))
    assert (tok.pad_token_id == tok.eos_token_id) == (pad == "eos")
    rm = RewardModel(make_tiny_model(tok, kind, seed=3).eval(), tok, kind, max_length=64, view=view)
    n_vocab, n_rows = len(tok), rm.model.get_input_embeddings().weight.shape[0]
    batch = len(PROMPTS)  # one batch on every path, so the padded batches are the same
    better = [rm.encode(p, r, with_offsets=kind == "token") for p, r in zip(PROMPTS, BETTER)]
    eval_scores, eval_tokens = _run(rm, better, batch, "eval-rm")
    ppo_scores, ppo_tokens = _ppo(rm, BETTER)
    assert ppo_scores == eval_scores
    assert rm.score(PROMPTS, BETTER, batch_size=batch) == eval_scores
    if kind == "token":
        assert ppo_tokens == eval_tokens
        items = [Comparison(str(i), p, b, w, None) for i, (p, b, w) in enumerate(zip(PROMPTS, BETTER, WORSE))]
        views = _views(rm, items, batch)
        assert [v.responses[0].rewards for v in views] == eval_tokens
        assert [v.responses[0].score for v in views] == pytest.approx(eval_scores, abs=1e-6)  # Eq. 1
    else:  # the score of each row alone, unpadded: the head at its closing EOS
        for ex, s in zip(better, eval_scores):
            with torch.no_grad():
                alone = rm.model.score(rm.model.transformer(torch.tensor([ex.input_ids])).last_hidden_state)
            assert s == pytest.approx(alone[0, -1, 0].item(), abs=1e-5)
    # nothing was added to the tokenizer or the model, and the model's own pad setting is back
    assert len(tok) == n_vocab and rm.model.get_input_embeddings().weight.shape[0] == n_rows
    assert rm.model.config.pad_token_id == tok.pad_token_id


def test_the_pad_rule():
    tok = train_bpe_tokenizer(CORPUS * 5, vocab_size=300)
    pad, eos = tok.pad_token_id, tok.eos_token_id
    assert batch_pad_id(tok, [[5, 6, eos], [7, eos]]) == pad  # the tokenizer's pad when no row holds it
    held = [[pad, 5, eos], [0, 1, 2, eos]]  # a policy may sample the pad token inside a response
    assert batch_pad_id(tok, held) not in {t for r in held for t in r}
    toy = [list(range(len(tok)))]  # a row holding every id: anything but the closing EOS
    assert batch_pad_id(tok, toy) != eos


def test_a_sampled_pad_token_inside_a_response_does_not_move_the_score():
    from finegrain.rm.inputs import rm_example_from_ids

    tok = train_bpe_tokenizer(CORPUS * 5, vocab_size=300)
    rm = make_tiny_model(tok, "sequence", seed=4).eval()
    rows = [[5, 6, tok.pad_token_id, 7], [8]]  # response ids a policy sampled; the first holds the pad token
    exs = [rm_example_from_ids([9], r, tok.eos_token_id, 64) for r in rows]
    scores = rm_forward(rm, tok, exs, "sequence", batch_size=2)
    for ex, s in zip(exs, scores):
        with torch.no_grad():
            alone = rm.score(rm.transformer(torch.tensor([ex.input_ids])).last_hidden_state)[0, -1, 0]
        assert s.item() == pytest.approx(alone.item(), abs=1e-5)


def test_one_kind_detection_for_reward_model_load_and_ppo_preflight(tmp_path):
    from finegrain.config import build_config
    from finegrain.errors import ConfigError
    from finegrain.models import save_checkpoint
    from finegrain.ppo.config import PPOConfig
    from finegrain.ppo.setup import preflight
    from finegrain.rm.model import reward_model_kind

    tok = train_bpe_tokenizer(CORPUS * 5, vocab_size=300)
    save_checkpoint(tmp_path / "seq", make_tiny_model(tok, "sequence"), tok, {})  # no kind: the architecture says
    save_checkpoint(tmp_path / "lm", make_tiny_model(tok, "causal"), tok, {})
    assert reward_model_kind(str(tmp_path / "seq")) == "sequence"
    for path, message in ((tmp_path / "none", "reward model directory not found"),
                          (tmp_path / "lm", "is not a reward model")):
        with pytest.raises(ConfigError, match=message):
            RewardModel.load(str(path))
        cfg = build_config(PPOConfig, dict(policy=str(tmp_path / "lm"), reward_model=str(path), prompts="x",
                                           output="o", reward_mode="sequence"))
        with pytest.raises(ConfigError, match=message):
            preflight(cfg)
