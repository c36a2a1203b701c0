"""Cross-tokenizer token rewards from an RM tokenizer that trims offsets (RoBERTa-style byte-level BPE).

Such a tokenizer gives a token of whitespace alone (a double space, a trailing space) a zero-width
offset. Its reward must go to the policy tokens holding that whitespace, not to the policy's last
token; every response keeps the sum of its rewards.
"""
from __future__ import annotations

import pytest
import torch

from conftest import CORPUS
from finegrain.ppo.rewards import RewardScorer, map_rewards_by_offsets, policy_token_offsets, spread_trimmed_offsets
from finegrain.rm.inputs import build_rm_example
from finegrain.rm.scorer import rm_forward
from finegrain.tokens import is_encoder_style


def roberta_style_tokenizer():
    """A byte-level BPE trained here, with RoBERTa's <s> A </s></s> B </s> layout and trimmed offsets."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS * 10, trainer=trainers.BpeTrainer(
        vocab_size=350, special_tokens=["<s>", "<pad>", "</s>", "<unk>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.post_processor = processors.RobertaProcessing(("</s>", tk.token_to_id("</s>")), ("<s>", tk.token_to_id("<s>")),
                                                     trim_offsets=True, add_prefix_space=False)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                   cls_token="<s>", pad_token="<pad>", unk_token="<unk>", model_max_length=128)


def tiny_roberta_token_rm(tok, seed: int = 0):
    from transformers import RobertaConfig, RobertaForTokenClassification

    torch.manual_seed(seed)
    cfg = RobertaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=160, pad_token_id=tok.pad_token_id,
                        num_labels=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return RobertaForTokenClassification(cfg).eval()


def test_spread_trimmed_offsets_by_hand():
    # "x   y": three lone-space tokens trimmed to (2,2), (3,3), (4,4) share the uncovered characters 1..3
    assert spread_trimmed_offsets([(0, 1), (2, 2), (3, 3), (4, 4), (4, 5)], 5) == [
        (0, 1), (1, 4), (1, 4), (1, 4), (4, 5)]
    # a trailing space "city " -> (27, 27): its character is 26
    assert spread_trimmed_offsets([(22, 23), (23, 26), (27, 27)], 27) == [(22, 23), (23, 26), (26, 27)]
    # no uncovered character around a zero-width span: kept as it is
    assert spread_trimmed_offsets([(0, 3), (3, 3), (3, 6)], 6) == [(0, 3), (3, 3), (3, 6)]


def test_trimmed_whitespace_rewards_land_on_the_whitespace_not_on_the_last_policy_token(tiny_tokenizer):
    pol_tok, rm_tok = tiny_tokenizer, roberta_style_tokenizer()
    assert is_encoder_style(rm_tok)
    prompts = ["Be polite.", "List fruit.", "Where?"]
    texts = ["Paris is  large.\n\nThe city ", "apples,  bananas   and  cherries", "In  Paris. "]
    for text in texts:  # the situation: whitespace tokens with zero-width offsets inside the response
        ex = build_rm_example(rm_tok, "p", text, max_length=128, with_offsets=True)
        assert any(s == e for s, e in ex.response_offsets[:-1]), text
    q = [pol_tok(p + "\n", add_special_tokens=False)["input_ids"] for p in prompts]
    rows = [pol_tok(t, add_special_tokens=False)["input_ids"] + [pol_tok.eos_token_id] for t in texts]  # all ended
    from finegrain.tokens import right_pad

    r_ids, r_mask = right_pad(rows, pol_tok.pad_token_id)
    rm = tiny_roberta_token_rm(rm_tok)
    out = RewardScorer(rm, rm_tok, "token", pol_tok, max_length=128).score(prompts, q, r_ids, r_mask, texts)
    exs = [build_rm_example(rm_tok, p, t, max_length=128, with_offsets=True) for p, t in zip(prompts, texts)]
    raw = rm_forward(rm, rm_tok, exs, "token", batch_size=4)
    for b, (ex, r, text) in enumerate(zip(exs, raw, texts)):
        n = len(rows[b])
        got = out.token_rewards[b, :n]
        assert got.sum().item() == pytest.approx(r.sum().item(), abs=1e-5)  # each response keeps its sum
        assert got[-1].item() == pytest.approx(r[-1].item(), abs=1e-6)  # the policy's EOS gets the closing token only
        dst = policy_token_offsets(pol_tok, rows[b], text)
        before = map_rewards_by_offsets(ex.response_offsets, r.tolist(), dst)  # the unspread mapping
        zero = [k for k, (s, e) in enumerate(ex.response_offsets[:-1]) if s == e]
        assert before[-1] == pytest.approx(r[-1].item() + sum(r[k].item() for k in zero), abs=1e-5)
        for k in zero:  # each whitespace token's reward went to the policy tokens covering its characters
            lo, hi = spread_trimmed_offsets(ex.response_offsets[:-1], len(text))[k]
            assert text[lo:hi].strip() == "" and hi > lo
            holders = [j for j, (s, e) in enumerate(dst) if min(e, hi) > max(s, lo)]
            assert holders and n - 1 not in holders


def test_ppo_with_a_roberta_style_rm_through_the_cli(tmp_path, tiny_tokenizer, capsys):
    """finegrain ppo --cross-tokenizer with the trimming RM: each sample keeps the RM's reward sum, and an
    ended response's EOS carries exactly the RM's closing-token reward."""
    import json

    from conftest import make_tiny_model
    from finegrain.cli import main
    from finegrain.models import save_checkpoint

    rm_tok = roberta_style_tokenizer()
    rm = tiny_roberta_token_rm(rm_tok, seed=3)
    save_checkpoint(tmp_path / "rm", rm, rm_tok, {"kind": "token"})
    save_checkpoint(tmp_path / "policy", make_tiny_model(tiny_tokenizer, "causal", seed=2, n_positions=64),
                    tiny_tokenizer, {"kind": "policy"})
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n"
                                                    for p in ("Be polite.", "List fruit.", "Where?", "How tall?")))
    argv = ["ppo", "--policy", tmp_path / "policy", "--reward-model", tmp_path / "rm", "--reward-mode", "token",
            "--prompts", tmp_path / "prompts.jsonl", "--output", tmp_path / "ppo", "--cross-tokenizer",
            "--value-init", "policy", "--steps", 2, "--batch-size", 4, "--max-new-tokens", 12, "--sample-every", 1,
            "--num-samples", 4, "--log-with", "none", "--temperature", 1.5,
            "--token-reward-scale", "raw"]  # samples.jsonl then holds r_t as mapped
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    samples = [json.loads(x) for x in (tmp_path / "ppo" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8
    for s in samples:
        ex = build_rm_example(rm_tok, s["prompt"], s["response"], max_length=65, with_offsets=True)
        (r,) = rm_forward(rm, rm_tok, [ex], "token", batch_size=1)
        assert sum(s["token_rewards"]) == pytest.approx(r.sum().item(), abs=1e-3)
        if s["ended"]:
            assert s["token_rewards"][-1] == pytest.approx(r[-1].item(), abs=1e-3)
