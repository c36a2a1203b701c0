"""Loading and sampling edge cases: every EOS a model names, prompts past the context, empty prompts,
checkpoints without a tokenizer, damaged finegrain.json."""
from __future__ import annotations

import json
import logging
import shutil

import pytest

from conftest import make_tiny_model
from finegrain.cli import main
from finegrain.errors import ConfigError, InputError
from finegrain.generation import generate_texts, sample, stop_token_ids
from finegrain.models import load_tokenizer, read_meta, save_checkpoint
from finegrain.tokens import encode_texts

PROMPTS = ["The capital of", "Step 1: preheat the oven", "Paris", "I am sorry, but I cannot help"]


@pytest.mark.parametrize("decoder", ["loop", "generate"])
def test_responses_end_at_every_eos_the_generation_config_names(sharp_model, tiny_tokenizer, decoder):
    """A chat model's end-of-turn token (Gemma's <end_of_turn>, Llama 3's <|eot_id|>) listed in its
    generation_config ends a response, as in transformers' generate, in both decoders."""
    ids = encode_texts(tiny_tokenizer, PROMPTS)
    ref = sample(sharp_model, tiny_tokenizer, ids, max_new_tokens=12, do_sample=False, decoder=decoder)
    turn_end = int(ref.response_ids[0, 3])  # a token row 0 emits at step 3
    assert turn_end != tiny_tokenizer.eos_token_id and not ref.ended[0]
    gc = sharp_model.generation_config
    gc.eos_token_id = [tiny_tokenizer.eos_token_id, turn_end]
    try:
        assert stop_token_ids(tiny_tokenizer, sharp_model) == [tiny_tokenizer.eos_token_id, turn_end]
        g = sample(sharp_model, tiny_tokenizer, ids, max_new_tokens=12, do_sample=False, decoder=decoder)
        hf = sharp_model.generate(input_ids=g.query_ids, attention_mask=g.query_mask, do_sample=False,
                                  max_new_tokens=12, pad_token_id=tiny_tokenizer.pad_token_id)
    finally:
        gc.eos_token_id = tiny_tokenizer.eos_token_id
    assert g.ended[0] and int(g.response_mask[0].sum()) <= 4 and turn_end in g.response_ids[0].tolist()
    hf_resp = hf[:, g.query_ids.shape[1]:]
    for row, mask, want in zip(g.response_ids, g.response_mask, hf_resp):
        n = int(mask.sum())
        assert row[:n].tolist() == want[:n].tolist()  # the tokens generate gives, cut where it stops
        assert (row[n:] == tiny_tokenizer.pad_token_id).all()


def test_stop_token_ids_are_the_tokenizers_eos_when_the_model_names_no_other(sharp_model, tiny_tokenizer):
    assert stop_token_ids(tiny_tokenizer, sharp_model) == [tiny_tokenizer.eos_token_id]


def test_an_empty_prompt_is_refused_in_one_line(sharp_model, tiny_tokenizer):
    ids = encode_texts(tiny_tokenizer, ["The capital of", ""])
    for decoder in ("loop", "generate"):
        with pytest.raises(ConfigError, match="prompt 2 of the batch has no tokens"):
            sample(sharp_model, tiny_tokenizer, ids, max_new_tokens=3, do_sample=False, decoder=decoder)


def test_prompts_longer_than_the_context_keep_their_end(tiny_tokenizer, caplog):
    model = make_tiny_model(tiny_tokenizer, "causal", seed=0, n_positions=32).eval()
    long = "Question: how tall is Mount Everest? " * 10
    n_long = len(encode_texts(tiny_tokenizer, [long + "\n"])[0])
    assert n_long > 32
    with caplog.at_level(logging.WARNING, logger="finegrain.generation"):
        out = generate_texts(model, tiny_tokenizer, [long, "Paris"], template="{prompt}\n", max_new_tokens=8,
                             do_sample=False, batch_size=2)
    assert len(out) == 2 and "1 prompt(s) longer than the 24 tokens" in caplog.text
    # the long prompt was cut to its last 24 tokens: the same output as asking for that directly
    cut = generate_texts(model, tiny_tokenizer, [long, "Paris"], template="{prompt}\n", max_new_tokens=8,
                         do_sample=False, batch_size=2, max_prompt_tokens=24)
    assert out == cut
    with pytest.raises(ConfigError, match="--max-new-tokens 32 leaves no room for a prompt"):
        generate_texts(model, tiny_tokenizer, ["Paris"], max_new_tokens=32)


def test_generate_cli_with_a_prompt_past_the_context_exits_0(tmp_path, tiny_tokenizer, capsys):
    d = tmp_path / "short-ctx"
    save_checkpoint(d, make_tiny_model(tiny_tokenizer, "causal", seed=0, n_positions=64), tiny_tokenizer, {})
    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in ["Question: how tall? " * 40, "Paris"]))
    code = main(["generate", "--model", str(d), "--prompts", str(p), "--output", str(tmp_path / "o.jsonl"),
                 "--max-new-tokens", "16", "--temperature", "0"])
    assert code == 0 and len((tmp_path / "o.jsonl").read_text().splitlines()) == 2
    code = main(["generate", "--model", str(d), "--prompts", str(p), "--output", str(tmp_path / "x.jsonl"),
                 "--max-new-tokens", "64"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "leaves no room for a prompt" in err[-1] and not (tmp_path / "x.jsonl").exists()


def test_a_checkpoint_without_tokenizer_files_is_refused(tmp_path, tiny_tokenizer, capsys):
    d = tmp_path / "ckpt"
    save_checkpoint(d, make_tiny_model(tiny_tokenizer, "causal", seed=0), tiny_tokenizer, {})
    assert len(load_tokenizer(str(d))) == len(tiny_tokenizer)
    for f in d.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "vocab.json", "merges.txt"):
            f.unlink()
    with pytest.raises(ConfigError, match="no vocabulary besides special tokens"):
        load_tokenizer(str(d))
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "Paris"}) + "\n")
    code = main(["generate", "--model", str(d), "--prompts", str(p), "--output", str(tmp_path / "o.jsonl"),
                 "--max-new-tokens", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "no vocabulary" in err


@pytest.mark.parametrize("damage", ["not utf-8", "directory", "too deep"])
def test_a_damaged_finegrain_json_is_one_input_error_naming_it(tmp_path, damage):
    meta = tmp_path / "m" / "finegrain.json"
    meta.parent.mkdir()
    if damage == "not utf-8":
        meta.write_bytes(b'{"kind": "\xff\xfe"}')
    elif damage == "directory":
        meta.mkdir()
    else:
        meta.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(InputError, match="finegrain.json"):
        read_meta(meta.parent)
    shutil.rmtree(meta.parent)
