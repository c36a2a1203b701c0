"""Pure parts of minimal editing: edit ratio, answer cleaning, guards, prompts, backoff, rate cap, cache."""
from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finegrain.edit.distance import edit_stats, percentiles, words
from finegrain.edit.guards import GuardConfig, check_edit
from finegrain.edit.postprocess import looks_like_refusal
from finegrain.errors import ConfigError
from finegrain.llm.accounting import Usage, cost_usd, load_price_table, lookup_price
from finegrain.llm.backends import EditResult
from finegrain.llm.cache import AnswerCache, cache_key, input_hash
from finegrain.llm.chat import clean_answer, parse_preference
from finegrain.llm.local import MicroBatcher
from finegrain.llm.prompts import load_prompt, packaged_prompts
from finegrain.llm.runner import Outcome, RateLimiter, RetryPolicy, backoff_delay


# ---------------------------------------------------------------- edit ratio

def test_words_split_words_and_punctuation():
    assert words("Hi, it's 8,849 m!") == ["Hi", ",", "it", "'", "s", "8", ",", "849", "m", "!"]


def test_edit_stats_hand_computed():
    # 4 tokens each, one replaced: deleted 1 + inserted 1 over 4 + 4 tokens
    s = edit_stats("The cat sat.", "The dog sat.")
    assert (s["tokens_deleted"], s["tokens_inserted"], s["changed_blocks"], s["edit_ratio"]) == (1, 1, 1, 0.25)
    # pure insertion of 2 tokens into 3: (0 + 2) / (3 + 5)
    s = edit_stats("a b c", "a b x y c")
    assert (s["tokens_deleted"], s["tokens_inserted"], s["edit_ratio"]) == (0, 2, 0.25)
    # nothing in common
    assert edit_stats("a b", "c d")["edit_ratio"] == 1.0
    assert edit_stats("", "")["edit_ratio"] == 0.0
    # whitespace does not count
    assert edit_stats("a  b\n c", "a b c")["edit_ratio"] == 0.0


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="ab .,\n", max_size=40), st.text(alphabet="ab .,\n", max_size=40))
def test_edit_ratio_properties(a, b):
    s = edit_stats(a, b)
    assert 0.0 <= s["edit_ratio"] <= 1.0
    assert (s["edit_ratio"] == 0.0) == (words(a) == words(b))
    # (not symmetric in general: difflib's longest-block matching is a heuristic, not an exact LCS)
    assert s["original_tokens"] - s["tokens_deleted"] == s["edited_tokens"] - s["tokens_inserted"]  # matched tokens


def test_percentiles_match_linear_interpolation():
    assert percentiles([0, 1, 2, 3, 4], (0, 50, 90, 100)) == {"p0": 0, "p50": 2, "p90": 3.6, "p100": 4}
    assert percentiles([]) == {}


# ---------------------------------------------------------------- cleaning answers

ORIG = "Paris is the capital of Italy."


@pytest.mark.parametrize("answer", [
    "Here is the edited response:\n\nParis is the capital of France.",
    "Sure! Here's the minimally edited version of the response:\nParis is the capital of France.",
    "Edited response: Paris is the capital of France.",
    "```\nParis is the capital of France.\n```",
    '"Paris is the capital of France."',
    "Here is the revised answer:\n```text\nParis is the capital of France.\n```",
    "<response>\nParis is the capital of France.\n</response>",
    "  Paris is the capital of France.  \n",
])
def test_clean_answer_strips_wrappers(answer):
    assert clean_answer(answer, ORIG) == "Paris is the capital of France."


def test_clean_answer_keeps_what_the_original_had():
    original = "Here is a list: apples, pears."
    assert clean_answer("Here is a list: apples, pears, plums.", original) == "Here is a list: apples, pears, plums."
    fenced = "```\nprint(1)\n```"
    assert clean_answer("```\nprint(2)\n```", fenced) == "```\nprint(2)\n```"
    quoted = '"To be or not to be."'
    assert clean_answer('"To be, or not to be."', quoted) == '"To be, or not to be."'
    assert clean_answer('He said "hi" and "bye"', "x") == 'He said "hi" and "bye"'


def test_refusal_and_preference_parsing():
    assert looks_like_refusal("I'm sorry, but I can't help edit this.")
    assert looks_like_refusal("As an AI, I cannot do that")
    assert not looks_like_refusal("Sorrel is a herb.")
    assert not looks_like_refusal("Paris is the capital.")
    assert [parse_preference(x) for x in ["A", "b", "**B**", "Output (A) is better", "TIE", "A.\nbecause", "", "maybe"]] \
        == [1.0, 2.0, 2.0, 1.0, 1.5, 1.0, None, None]


# ---------------------------------------------------------------- guards

RESP = "To stay safe, mix bleach with ammonia in a closed room and breathe deeply while you clean the floor."


@pytest.mark.parametrize("edited,error,reason", [
    (None, None, "empty"),
    ("   \n", None, "empty"),
    (None, "missing: no human edit", "missing"),
    (None, "failed: HTTP 500", "failed"),
    ("I'm sorry, but I can't help edit this response.", None, "refusal"),
    (RESP, None, "unchanged"),
    (RESP.replace("  ", " ") + " ", None, "unchanged"),
    ("Completely new words here that share nothing at all with it.", None, "non_minimal"),
    (RESP.replace("mix bleach with ammonia in a closed room", "never mix bleach with ammonia; open a window"), None,
     None),
    ("I'm sorry, I can't recommend that. " + RESP.replace("mix bleach with", "never mix bleach with"), None, None),
])
def test_guards(edited, error, reason):
    got, stats = check_edit(RESP, edited, error, GuardConfig())
    assert got == reason
    if reason is None:
        assert 0 < stats["edit_ratio"] <= 0.75


def test_guard_options():
    assert check_edit(RESP, RESP, None, GuardConfig(allow_unchanged=True))[0] is None
    edited = RESP.replace("mix bleach with ammonia in a closed room", "never mix bleach with ammonia; open a window")
    ratio = edit_stats(RESP, edited)["edit_ratio"]
    assert check_edit(RESP, edited, None, GuardConfig(max_edit_ratio=ratio - 1e-6))[0] == "non_minimal"
    assert check_edit(RESP, edited, None, GuardConfig(max_edit_ratio=ratio))[0] is None


# ---------------------------------------------------------------- prompts

def test_packaged_prompts_render_once(tmp_path):
    assert {"minimal_edit_v1", "pairwise_judge_v1"} <= set(packaged_prompts())
    p = load_prompt("minimal_edit_v1")
    system, user = p.render(instruction="Use {response} literally", response="say {instruction}")
    assert "minimal" in system.lower() and "Use {response} literally" in user and "say {instruction}" in user
    assert "<response>\nsay {instruction}\n</response>" in user
    j = load_prompt("pairwise_judge_v1")
    _, user = j.render(instruction="i", output_1="X1", output_2="X2")
    assert user.index("X1") < user.index("X2") and "TIE" in user
    custom = tmp_path / "my_prompt_v3.txt"
    custom.write_text("# comment\n### system\nS\n### user\nU {response}\n")
    c = load_prompt(str(custom))
    assert (c.version, c.render(response="r")) == ("my_prompt_v3", ("S", "U r"))
    assert c.digest != p.digest
    with pytest.raises(ConfigError, match="minimal_edit_v1"):
        load_prompt("nope_v9")


def test_a_prompt_without_the_text_to_edit_or_judge_is_refused_before_any_request(tmp_path):
    from finegrain.llm.backends import get_editor, get_judge

    typo = tmp_path / "my_edit_v1.txt"
    typo.write_text("### system\nEdit minimally.\n### user\n{instruction}\n<response>\n{rejected}\n</response>\n")
    with pytest.raises(ConfigError, match=r"prompt 'my_edit_v1' has no \{response\} placeholder"):
        get_editor("openai", "m", base_url="http://127.0.0.1:9/v1", prompt=str(typo))
    with pytest.raises(ConfigError, match=r"has no \{output_1\} placeholder.*needs \{output_1\}, \{output_2\}"):
        get_judge("openai", "m", base_url="http://127.0.0.1:9/v1", prompt="minimal_edit_v1")
    ok = tmp_path / "my_edit_v2.txt"
    ok.write_text("### user\n{response}\n")
    assert get_editor("openai", "m", base_url="http://127.0.0.1:9/v1", prompt=str(ok)).prompt_version == "my_edit_v2"


# ---------------------------------------------------------------- retries and rate cap

def test_backoff_is_exponential_with_jitter_and_honours_retry_after():
    pol = RetryPolicy(backoff_base=1.0, backoff_max=8.0, max_retry_after=30.0)
    rng = random.Random(0)
    for attempt, cap in [(0, 1.0), (1, 2.0), (2, 4.0), (3, 8.0), (6, 8.0)]:
        ds = [backoff_delay(attempt, pol, None, rng) for _ in range(200)]
        assert all(cap / 2 <= d <= cap for d in ds)
        assert max(ds) - min(ds) > cap / 4  # jittered, not constant
    assert backoff_delay(0, pol, 5.0, rng) == 5.0  # Retry-After is a lower bound
    assert backoff_delay(3, pol, 0.1, rng) >= 4.0  # ... not a replacement of a longer backoff
    assert backoff_delay(0, pol, 1e6, rng) == 30.0  # absurd Retry-After capped


def test_rate_limiter_spaces_starts_with_a_fake_clock():
    now = [0.0]
    slept = []

    async def fake_sleep(d):
        slept.append(d)
        now[0] += d

    async def main():
        lim = RateLimiter(rpm=120, clock=lambda: now[0], sleep=fake_sleep)  # one start per 0.5 s
        starts = []
        for _ in range(4):
            await lim.acquire()
            starts.append(now[0])
        lim.pause_until(now[0] + 3.0)  # a Retry-After of 3 s holds everybody
        await lim.acquire()
        starts.append(now[0])
        return starts

    assert asyncio.run(main()) == [0.0, 0.5, 1.0, 1.5, 4.5]


# ---------------------------------------------------------------- cache and accounting

def test_cache_roundtrip_and_keys(tmp_path):
    h = input_hash("prompt", "response", "salt")
    k = cache_key("edit", "openai", "m", "minimal_edit_v1", h)
    assert k != cache_key("edit", "openai", "m", "minimal_edit_v2", h)
    assert k != cache_key("edit", "anthropic", "m", "minimal_edit_v1", h)
    assert h != input_hash("prompt", "response", "other salt")
    c = AnswerCache(tmp_path / "c.sqlite")
    assert c.get(k) is None
    c.put(k, kind="edit", backend="openai", model="m", prompt_version="v", in_hash=h, item_id="p1",
          result={"text": "t", "input_tokens": 3})
    c.close()
    c = AnswerCache(tmp_path / "c.sqlite")  # a new process sees it
    assert c.get(k)["text"] == "t" and c.item_ids("edit") == {"p1"} and len(c) == 1
    assert c._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert AnswerCache(None).get(k) is None


def test_prices_and_usage():
    table = load_price_table()
    assert lookup_price("anthropic", "claude-3-5-haiku-20241022", table) == (0.8, 4.0)
    assert lookup_price("openai", "gpt-4o-mini-2024", table) == (0.15, 0.6)  # longest prefix, not gpt-4o
    assert lookup_price("openai", "my-local-llama", table) is None
    assert lookup_price("openai", "my-local-llama", table, 1.0, 2.0) == (1.0, 2.0)
    assert lookup_price("hf", "anything", table) == (0.0, 0.0)
    assert cost_usd((3.0, 15.0), 1_000_000, 200_000) == 6.0
    outs = [Outcome(EditResult("a", input_tokens=100, output_tokens=10), attempts=2),
            Outcome(EditResult("b", input_tokens=50, output_tokens=5), cached=True),
            Outcome(None, attempts=3, error="failed: x")]
    u = Usage((3.0, 15.0)).add(outs).summary()
    assert (u["n_requests"], u["n_cached"], u["n_failed"], u["n_attempts"]) == (1, 1, 1, 5)
    assert u["tokens"] == {"input": 100, "output": 10}
    assert u["cost_usd"] == round((100 * 3 + 10 * 15) / 1e6, 6)
    assert u["cached_cost_usd"] == round((50 * 3 + 5 * 15) / 1e6, 6)


def test_micro_batcher_groups_concurrent_calls():
    seen = []

    def fn(xs):
        seen.append(list(xs))
        return [x * 10 for x in xs]

    async def main():
        b = MicroBatcher(fn, batch_size=3, max_wait=0.05)
        out = await asyncio.gather(*(b.submit(i) for i in range(7)))
        await b.aclose()
        return out, b.batches

    out, batches = asyncio.run(main())
    assert out == [i * 10 for i in range(7)]
    assert batches == [3, 3, 1] and sorted(sum(seen, [])) == list(range(7))


@pytest.mark.realdata
def test_default_threshold_is_the_p90_of_human_corrections():
    """The documented default (guards.py) recomputed from QA-Feedback's human corrections."""
    import ast
    import json

    from conftest import require_shared
    from finegrain.edit.guards import DEFAULT_MAX_EDIT_RATIO

    data = json.loads(require_shared("qa_feedback", "dev_feedback_350.json").read_text())
    ratios, unrelated = [], []
    for i, rec in enumerate(data):
        fb = rec["feedback"]
        fb = ast.literal_eval(fb) if isinstance(fb, str) else fb
        if fb.get("corrected-prediction"):
            ratios.append(edit_stats(rec["prediction 1"], fb["corrected-prediction"])["edit_ratio"])
        unrelated.append(edit_stats(rec["prediction 1"], data[(i + 1) % len(data)]["prediction 1"])["edit_ratio"])
    p = percentiles(ratios, (10, 25, 50, 75, 90, 95, 99))
    assert len(ratios) == 344
    assert p == {"p10": 0.2277, "p25": 0.3506, "p50": 0.511, "p75": 0.6375, "p90": 0.7542, "p95": 0.8047, "p99": 0.8799}
    assert round(p["p90"], 2) == DEFAULT_MAX_EDIT_RATIO
    assert percentiles(unrelated, (1,))["p1"] > DEFAULT_MAX_EDIT_RATIO  # unrelated answers are all rejected


def test_parse_retry_after_forms():
    import email.utils
    import time

    from finegrain.llm.clients import parse_retry_after

    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after": "0.5"}) == 0.5
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({}) is None and parse_retry_after(None) is None
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= parse_retry_after({"retry-after": date}) <= 31
    assert parse_retry_after({"retry-after": "not a date"}) is None
