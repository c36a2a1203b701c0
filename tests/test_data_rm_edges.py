"""Edge cases of the data, edit and reward-model stages that once went wrong (each test failed before its fix)."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, strategies as st

from conftest import CORPUS, make_tiny_model
from finegrain.config import build_config
from finegrain.data import convert, load_pairs
from finegrain.errors import InputError
from finegrain.io import write_jsonl


def bos_only_tokenizer():
    """A decoder tokenizer that puts BOS before each text, Llama 3's tokenizer.json layout (``<bos> a <bos> b``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS * 10, trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos = tk.token_to_id("<|begin_of_text|>")
    tk.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                      pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                   pad_token="<|end_of_text|>")


def test_a_decoder_tokenizer_that_adds_bos_takes_the_decoder_layout():
    """Llama 2/3, Mistral, Gemma add BOS to a pair of texts: that made them "encoder-style", so SFT refused them
    and reward-model responses lost their closing EOS."""
    from finegrain.rm.inputs import build_rm_example, check_view
    from finegrain.sft.data import build_sft_example
    from finegrain.tokens import is_encoder_style
    from test_cross_tokenizer_offsets import roberta_style_tokenizer

    tok = bos_only_tokenizer()
    assert tok.num_special_tokens_to_add(pair=True) == 2 and not is_encoder_style(tok)
    ex = build_rm_example(tok, "Where is Paris?", "Paris is in France.", max_length=64, with_offsets=True)
    assert ex.input_ids[-1] == tok.eos_token_id and ex.response_offsets[-1] == (19, 19)
    assert tok.decode(ex.response_ids[:-1]) == "Paris is in France."
    check_view(tok, "echo")  # the echo view is for decoders: accepted
    sft = build_sft_example(tok, "Where is Paris?", "Paris is in France.", max_length=64)
    assert sft.input_ids[-1] == tok.eos_token_id
    assert is_encoder_style(roberta_style_tokenizer())  # <s> a </s></s> b </s>: still an encoder


OASST_TIED = {"message_tree_id": "t", "prompt": {"message_id": "m", "role": "prompter", "text": "Hi", "replies": [
    {"message_id": "a", "role": "assistant", "text": "Hello, how can I help?", "rank": 0, "replies": []},
    {"message_id": "b", "role": "assistant", "text": "Go away.", "rank": 1, "replies": []},
    {"message_id": "c", "role": "assistant", "text": "What?", "rank": 1, "replies": []},
    {"message_id": "d", "role": "assistant", "text": "Hi.", "rank": 2, "replies": []}]}}


def test_oasst_siblings_sharing_a_rank_give_distinct_pair_ids(tmp_path):
    """Two replies of rank 1 gave two pairs both named ``m:r0>r1``: convert stopped at a duplicate id."""
    src = tmp_path / "t.jsonl"
    src.write_text(json.dumps(OASST_TIED) + "\n")
    s = convert("oasst", src, tmp_path / "out")
    assert (s["n_pairs"], s["n_ties_dropped"], s["n_rejected"]) == (5, 1, 0)
    got = {(p.chosen, p.rejected): p.id for p in load_pairs(tmp_path / "out" / "pairs.jsonl")}
    assert got == {("Hello, how can I help?", "Go away."): "m:a>b", ("Hello, how can I help?", "What?"): "m:a>c",
                   ("Hello, how can I help?", "Hi."): "m:r0>r2", ("Go away.", "Hi."): "m:b>d",
                   ("What?", "Hi."): "m:c>d"}


def test_absorbing_coincidences_reaches_a_fixed_point():
    """A merge on the right grows the block left of an equal run, which must then be absorbed too."""
    from finegrain.rm.align import absorb_coincidences, align_tokens

    ops = [("replace", 0, 3, 0, 3), ("equal", 3, 5, 3, 5), ("replace", 5, 7, 5, 7), ("equal", 7, 8, 7, 8),
           ("replace", 8, 13, 8, 13)]
    assert absorb_coincidences(ops) == [("replace", 0, 13, 0, 13)]
    # the same through token ids: two shared runs (10 11, then 12) inside one rewrite of 13 tokens
    original = [1, 2, 3, 10, 11, 4, 5, 12, 6, 7, 8, 9, 13, 0]
    edited = [31, 32, 33, 10, 11, 34, 35, 12, 36, 37, 38, 39, 40, 0]
    al = align_tokens(original, edited)
    assert al.changed_original == [True] * 13 + [False] and al.changed_edited == [True] * 13 + [False]


@given(st.lists(st.integers(1, 4), max_size=40), st.lists(st.integers(1, 4), max_size=40))
def test_absorbing_coincidences_is_idempotent(a, b):
    import difflib

    from finegrain.rm.align import absorb_coincidences

    once = absorb_coincidences(difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes())
    assert absorb_coincidences(once) == once


def save_token_rm(path, tokenizer, max_length: int = 64):
    from finegrain.models import save_checkpoint

    model = make_tiny_model(tokenizer, "token", seed=1, n_positions=64)
    save_checkpoint(path, model, tokenizer, {"kind": "token", "max_length": max_length})
    return path


def test_gold_spans_of_preference_pairs_are_checked_and_scored(tmp_path, tiny_tokenizer):
    """DESIGN.md: gold spans are honoured on preference pairs too. They were ignored, even when out of range."""
    from finegrain.rm import EvalRMConfig, evaluate_reward_model
    from finegrain.rm.data import load_comparisons

    rejected = "You are stupid for asking that."
    rows = [{"id": "a", "prompt": "Be polite.", "chosen": "Happy to help.", "rejected": rejected,
             "gold_spans": [[8, 14], [10, 12]]},
            {"id": "b", "prompt": "Be polite.", "chosen": "Sure.", "rejected": "Go away."}]
    write_jsonl(tmp_path / "p.jsonl", rows)
    items = load_comparisons(str(tmp_path / "p.jsonl"), "preference")
    assert [c.gold_spans for c in items] == [[(8, 14)], None]      # merged like an edit's, None when absent
    assert load_pairs(tmp_path / "p.jsonl")[0].meta["gold_spans"] == [[8, 14]]
    write_jsonl(tmp_path / "bad.jsonl", [dict(rows[0], gold_spans=[[8, 99]])])
    with pytest.raises(InputError, match=r"line 1: field 'gold_spans': span 0 \[8, 99\] is outside"):
        load_pairs(tmp_path / "bad.jsonl")
    rm = save_token_rm(tmp_path / "rm", tiny_tokenizer)
    res = evaluate_reward_model(build_config(EvalRMConfig, dict(
        model=str(rm), data=str(tmp_path / "p.jsonl"), output=str(tmp_path / "e.json"), pairs="preference",
        flaw_threshold=0.0)))
    assert res["token_auroc_source"] == "gold_spans" and res["n_gold_spans"] == 1
    assert res["token_auroc_n_pos"] >= 1 and res["token_auroc_n_tokens"] < 20  # pair "a" only


def test_span_figures_leave_out_gold_spans_the_cut_response_never_showed(tmp_path, tiny_tokenizer):
    """A gold span beyond --max-length could be neither flagged nor found, yet counted as a missed gold span."""
    from finegrain.rm import EvalRMConfig, evaluate_reward_model

    rejected = "You are stupid for asking that. Please answer in three short sentences and be polite to the user."
    far = rejected.index("polite")
    row = {"id": "a", "prompt": "Be polite.", "rejected": rejected, "edited": rejected.replace("stupid", "kind"),
           "gold_spans": [[8, 14], [far, far + 6]]}
    write_jsonl(tmp_path / "e.jsonl", [row])
    rm = save_token_rm(tmp_path / "rm", tiny_tokenizer)
    res = evaluate_reward_model(build_config(EvalRMConfig, dict(
        model=str(rm), data=str(tmp_path / "e.jsonl"), output=str(tmp_path / "e.json"), max_length=12,
        flaw_threshold=1e6)))  # every token flagged: every gold span the RM saw is found
    assert res["n_truncated"] == 1 and res["token_recall"] == 1.0
    assert res["n_gold_spans"] == 1 and res["span_recall"] == 1.0


def test_train_rm_says_when_the_held_out_split_took_every_pair(tmp_path, tiny_tokenizer):
    """One pair whose id --eval-fraction holds out: the error blamed identical responses (0 of them)."""
    from finegrain.rm import TrainRMConfig
    from finegrain.rm.train import prepare_data
    from finegrain.training import held_out

    pid = next(f"x{i}" for i in range(1000) if held_out(f"x{i}", 0.05, 0))
    write_jsonl(tmp_path / "one.jsonl", [{"id": pid, "prompt": "Be polite.", "rejected": "You are stupid.",
                                         "edited": "You are kind."}])
    cfg = build_config(TrainRMConfig, dict(data=str(tmp_path / "one.jsonl"), model="unused", output=str(tmp_path / "o"),
                                           eval_fraction=0.05, seed=0, max_length=32, log_with="none"))
    with pytest.raises(InputError, match=r"1 held out for evaluation by --eval-fraction 0.05: lower it"):
        prepare_data(cfg, tiny_tokenizer)


@pytest.mark.parametrize("text", ["The dog\x00 sat.", "The dog sat.\x1b[31m", "The dog\x85sat."])
def test_edit_guard_rejects_text_the_pair_files_refuse(text):
    """An accepted edit with a control character made train-rm stop at that line of the edited file."""
    from finegrain.data.loaders import pair_from_record
    from finegrain.edit.guards import GuardConfig, check_edit

    with pytest.raises(InputError):
        pair_from_record({"prompt": "p", "rejected": "The cat sat.", "edited": text}, "edit")
    assert check_edit("The cat sat.", text, None, GuardConfig()) == ("invalid_text", None)
    assert check_edit("The cat sat.", "The dog sat.\r\n\tYes.", None, GuardConfig())[0] is None



def test_eval_rm_data_given_as_a_datasets_name_is_not_a_training_file(tmp_path):
    """eval-rm --data NAME[:split] of an RM trained on a local file stopped with FileNotFoundError (a traceback)."""
    from finegrain.rm.evaluate import warn_if_seen_in_training

    (tmp_path / "train.jsonl").write_text("{}\n")
    meta = {"data": str(tmp_path / "train.jsonl"), "eval_data": str(tmp_path / "train.jsonl")}
    assert warn_if_seen_in_training("Anthropic/hh-rlhf:test", meta) is None
    assert warn_if_seen_in_training(str(tmp_path / "train.jsonl"), meta) == "training data"


def test_prompts_start_with_the_bos_a_llama_style_tokenizer_puts_first(monkeypatch):
    """Llama, Mistral and Gemma are trained with BOS first: every model input (SFT and RM examples, PPO queries,
    `generate`) starts with it, once, also when a chat template already writes it, and also when a prompt is cut."""
    from finegrain import generation
    from finegrain.tokens import decoder_example, encode_prompts, leading_bos
    from test_cross_tokenizer_offsets import roberta_style_tokenizer

    tok = bos_only_tokenizer()
    bos = tok.bos_token_id
    assert leading_bos(tok) == bos and leading_bos(roberta_style_tokenizer()) is None
    plain = tok("Where is Paris?\n", add_special_tokens=False)["input_ids"]
    assert encode_prompts(tok, ["Where is Paris?\n", "<|begin_of_text|>Where is Paris?\n"]) == [[bos] + plain] * 2
    ex = decoder_example(tok, "Where is Paris?", "In France.", max_length=64)
    assert ex.input_ids[:len(plain) + 1] == [bos] + plain and ex.input_ids[-1] == tok.eos_token_id

    seen = []
    monkeypatch.setattr(generation, "sample", lambda model, tk, ids, **kw: seen.extend(ids) or
                        type("G", (), {"texts": [""] * len(ids)})())
    model = type("M", (), {"config": None})()
    generation.generate_texts(model, tok, ["Where is Paris?", "Why?"], max_prompt_tokens=3, batch_size=2)
    full = [[bos] + tok(t, add_special_tokens=False)["input_ids"] for t in ("Where is Paris?\n", "Why?\n")]
    assert len(full[0]) > 3  # cut to its BOS and its last two tokens
    assert sorted(seen) == sorted(s if len(s) <= 3 else [bos] + s[-2:] for s in full)
