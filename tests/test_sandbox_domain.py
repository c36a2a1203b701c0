"""Sandbox domain: prompt parsing, gold reward and flawed spans on hand-built responses (exact numbers)."""
from __future__ import annotations

import random

import pytest

from finegrain.sandbox.domain import (
    TOPICS, ResponseStyle, gold_score, make_demonstrations, make_prompts, max_reward, parse_prompt,
    sample_response, sample_spec, split_sentences, vocabulary,
)

PROMPT = "how do i clean the oven ? my oven is red . please mention the sponge . answer in three sentences ."


def test_parse_prompt_roundtrip():
    spec = parse_prompt(PROMPT)
    assert (spec.topic.name, spec.colour, spec.item, spec.n) == ("oven", "red", "sponge", 3)
    assert spec.prompt == PROMPT
    rng = random.Random(0)
    for _ in range(50):
        s = sample_spec(rng)
        assert parse_prompt(s.prompt) == s


@pytest.mark.parametrize("bad", ["", "how do i fly ? my oven is red . please mention the sponge . answer in three sentences .",
                                 PROMPT.replace("sponge", "wrench"), PROMPT.replace("three", "nine")])
def test_parse_prompt_rejects(bad):
    with pytest.raises(ValueError):
        parse_prompt(bad)


def test_gold_mixed_response_exact():
    r = "happy to help . wipe the glass with a damp sponge . your blue oven will look new again , you lazy fool ."
    g = gold_score(PROMPT, r)
    # item covered 1.0 + length 3 == 3 0.5 + 2 distinct content * 0.25 - (contradiction 1.0 + rude 1.0)
    assert (g.item, g.length, g.helpful, g.penalty) == (1.0, 0.5, 0.5, 2.0)
    assert g.reward == 0.0
    assert [f.kind for f in g.flaws] == ["contradiction", "rude"]
    blue = r.index("blue")
    rude = r.index(", you lazy fool")
    assert g.flawed_spans == [(blue, blue + 4), (rude, rude + len(", you lazy fool"))]


def test_gold_unsafe_and_repeat_exact():
    r = ("mix bleach and ammonia for a stronger cleaner . take out the racks first . "
         "take out the racks first , my friend .")
    g = gold_score(PROMPT, r)
    # no item 0 + length 0.5 + one distinct content sentence 0.25 - (unsafe 2.0 + repeat 0.5)
    assert (g.item, g.length, g.helpful, g.penalty, g.reward) == (0.0, 0.5, 0.25, 2.5, -1.75)
    second = r.index("take out the racks first , my friend .")
    assert g.flawed_spans == [(0, r.index(" take")), (second, len(r))]
    assert [f.kind for f in g.flaws] == ["unsafe", "repeat"]


def test_gold_perfect_and_off_topic_and_garbled():
    perfect = "take out the racks first . wipe the glass with a damp sponge . your red oven will look new again ."
    assert gold_score(PROMPT, perfect).reward == max_reward(parse_prompt(PROMPT)) == 2.25
    r = "flip the bike upside down . wipe the glass with a damp sponge . sponge sponge the"
    g = gold_score(PROMPT, r)
    # item 1.0 + length 0.5 + 1 content 0.25 - (off_topic 1.0 + garbled fragment 1.0)
    assert g.reward == -0.25
    assert [(f.kind, r[f.start:f.end]) for f in g.flaws] == [
        ("off_topic", "flip the bike upside down ."), ("garbled", "sponge sponge the")]
    assert gold_score(PROMPT, "").reward == 0.0
    # an opener is only an opener first; later it is garbled
    assert [f.kind for f in gold_score(PROMPT, "take out the racks first . happy to help .").flaws] == ["garbled"]


def test_rude_opener_counts_as_sentence():
    r = "what a dumb question . take out the racks first . wipe the glass with a damp sponge ."
    g = gold_score(PROMPT, r)
    assert (g.reward, g.n_sentences) == (1.0 + 0.5 + 0.5 - 1.0, 3)
    assert g.flawed_spans == [(0, len("what a dumb question ."))]


def test_split_sentences_spans():
    assert split_sentences("a b . c .  d") == [(0, 5), (6, 9), (11, 12)]
    assert split_sentences("   ") == []


def test_token_labels_through_tokenizer():
    from finegrain.scratch import train_bpe_tokenizer
    from finegrain.rm.align import spans_to_token_mask

    demos = make_demonstrations(300, seed=1)
    tok = train_bpe_tokenizer([d["prompt"] + "\n" + d["response"] for d in demos], vocab_size=1024)
    r = "take out the racks first , you lazy fool . your blue oven will look new again ."
    enc = tok(r, add_special_tokens=False, return_offsets_mapping=True)
    labels = spans_to_token_mask(enc["offset_mapping"] + [(len(r), len(r))], gold_score(PROMPT, r).flawed_spans)
    assert labels[-1] is False  # the closing EOS is never flawed
    covered = {k for (s, e), lab in zip(enc["offset_mapping"], labels) if lab for k in range(s, e)}
    rude, blue = r.index(", you lazy fool"), r.index("blue")
    want = {k for k in [*range(rude, rude + 15), *range(blue, blue + 4)] if r[k] != " "}
    assert covered == want


def test_demonstrations_are_deterministic_and_flawed_at_the_rate():
    assert make_demonstrations(20, seed=3) == make_demonstrations(20, seed=3)
    assert make_demonstrations(20, seed=3) != make_demonstrations(20, seed=4)
    assert make_prompts(5, 1) == make_prompts(5, 1)
    rng = random.Random(0)
    clean = [gold_score(s, sample_response(s, rng, ResponseStyle(flaw_rate=0.0)))
             for s in (sample_spec(rng) for _ in range(200))]
    assert all(g.penalty == 0 for g in clean)
    flawed = [gold_score(d["prompt"], d["response"]) for d in make_demonstrations(400, seed=0)]
    rate = sum(g.penalty > 0 for g in flawed) / len(flawed)
    assert 0.4 < rate < 0.9  # flaw_rate 0.3 per sentence, about 3 sentences


def test_vocabulary_is_small_and_items_unique():
    assert 200 < len(vocabulary()) < 400
    for t in TOPICS:
        texts = list(t.steps) + list(t.facts) + list(t.unsafe) + list(t.items.values())
        for word, sentence in t.items.items():
            assert [s for s in texts if word in s.split()] == [sentence], (t.name, word)
