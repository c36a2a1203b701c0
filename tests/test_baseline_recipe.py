"""The README's baseline recipe on a policy whose pad token is its EOS (GPT-2, SmolLM2 without a pad token).

sft -> a sequence RM from the SFT policy -> PPO with the same tokenizer and the value model
initialised from the RM (``--value-init reward``, the default), all through the command line.
The RM carries one token more than the policy (its own pad, so that transformers' "last non-pad
token" is its closing EOS); PPO must still read the policy's ids without re-tokenising.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finegrain.cli import main
from finegrain.config import build_config
from finegrain.io import write_jsonl
from test_rm_train import make_base_model, synthetic_pairs

pytestmark = pytest.mark.usefixtures("single_thread")  # one torch thread: tiny models


def cli(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("recipe")
    base = make_base_model(d / "base", pad=False)
    rows = synthetic_pairs(32, seed=1)
    write_jsonl(d / "sft.jsonl", [{"prompt": r["prompt"], "response": r["chosen"]} for r in rows])
    write_jsonl(d / "pairs.jsonl", rows)
    write_jsonl(d / "prompts.jsonl", [{"prompt": r["prompt"]} for r in rows[:8]])
    common = ("--log-with", "none", "--max-length", 48)
    assert cli("sft", "--data", d / "sft.jsonl", "--model", base, "--output", d / "sft", "--lr", 1e-3, *common) == 0
    assert cli("train-rm", "--data", d / "pairs.jsonl", "--pairs", "preference", "--model", d / "sft",
               "--loss", "sequence", "--output", d / "rm-seq", "--epochs", 2, "--lr", 3e-3, *common) == 0
    return d


def test_sequence_rm_from_a_pad_eos_policy_trains_ppo_on_the_same_tokenizer(recipe, capsys):
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer

    from finegrain.ppo import PPOConfig
    from finegrain.ppo.setup import preflight

    policy_tok, rm_tok = AutoTokenizer.from_pretrained(recipe / "sft"), AutoTokenizer.from_pretrained(recipe / "rm-seq")
    assert policy_tok.pad_token in (None, policy_tok.eos_token) and len(rm_tok) == len(policy_tok) + 1
    argv = ["--policy", recipe / "sft", "--reward-model", recipe / "rm-seq", "--reward-mode", "sequence",
            "--prompts", recipe / "prompts.jsonl", "--output", recipe / "ppo", "--steps", 2, "--batch-size", 4,
            "--max-new-tokens", 8, "--log-with", "none"]
    cfg = build_config(PPOConfig, {"policy": str(recipe / "sft"), "reward_model": str(recipe / "rm-seq"),
                                   "reward_mode": "sequence", "prompts": str(recipe / "prompts.jsonl"),
                                   "output": str(recipe / "ppo"), "max_new_tokens": 8})
    assert cfg.value_init == "reward" and not cfg.cross_tokenizer and preflight(cfg).same_tokenizer
    capsys.readouterr()
    assert cli("ppo", *argv) == 0, capsys.readouterr().err
    lines = [json.loads(x) for x in (recipe / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2] and all(torch.isfinite(torch.tensor(m["reward"])) for m in lines)
    AutoModelForCausalLM.from_pretrained(recipe / "ppo" / "final")
    value = AutoModelForTokenClassification.from_pretrained(recipe / "ppo" / "value")
    assert value.config.vocab_size == len(rm_tok)  # initialised from the RM: its extra pad row is never read


def test_the_policy_ids_path_scores_like_the_reward_model_itself(recipe):
    """RM scores of policy ids equal RewardModel.score on the texts (one forward, one pad rule)."""
    from finegrain.tokens import encode_texts, format_prompt, right_pad
    from finegrain.models import load_tokenizer
    from finegrain.ppo.rewards import RewardScorer
    from finegrain.rm import RewardModel

    rm = RewardModel.load(str(recipe / "rm-seq"), max_length=128)  # nothing is cut: truncation is not tested here
    policy_tok = load_tokenizer(str(recipe / "sft"), padding_side="left")
    rows = synthetic_pairs(5, seed=4)
    prompts, texts = [r["prompt"] for r in rows], [r["rejected"] for r in rows]
    queries = encode_texts(policy_tok, [format_prompt(policy_tok, p, None) for p in prompts])
    ended = [t_ids + [policy_tok.eos_token_id] for t_ids in encode_texts(policy_tok, texts)]
    response_ids, response_mask = right_pad(ended, policy_tok.pad_token_id)
    scorer = RewardScorer(rm.model, rm.tokenizer, "sequence", policy_tok, max_length=128, batch_size=2)
    assert scorer.same_tokenizer  # ids, not re-tokenised text
    out = scorer.score(prompts, [list(q) for q in queries], response_ids, response_mask, texts)
    assert out.scores.tolist() == pytest.approx(rm.score(prompts, texts, batch_size=3), abs=1e-5)
