"""Simulated annotators and the gold judge: BT probabilities, calibrated noise, determinism."""
from __future__ import annotations

import asyncio
import math
import random

import pytest

from finegrain.sandbox.annotators import (
    Annotator, calibrate_temperature, default_temperature, expected_disagreement, prefer_first, reference_deltas,
)
from finegrain.sandbox.backends import SandboxJudge
from finegrain.sandbox.domain import ResponseStyle, gold_reward, sample_response, sample_spec
from finegrain.llm.backends import JudgeRequest


def test_expected_disagreement_exact():
    # sigmoid(-1/1) = 0.268941..., sigmoid(-2/1) = 0.119203...; the zero delta is left out
    assert expected_disagreement([1.0, -2.0, 0.0], 1.0) == pytest.approx((0.2689414214 + 0.1192029220) / 2)
    assert expected_disagreement([1.0], 0.0) == 0.0


def test_calibrate_temperature_hits_target():
    deltas = [0.5, 1.0, 2.0, -3.0]
    for noise in (0.05, 0.25, 0.4):
        t = calibrate_temperature(deltas, noise)
        assert expected_disagreement(deltas, t) == pytest.approx(noise, abs=1e-6)
    assert calibrate_temperature(deltas, 0.0) == 0.0
    with pytest.raises(ValueError):
        calibrate_temperature(deltas, 0.5)


def test_prefer_first_is_bt():
    # p(1 > 2) = sigmoid((1.0 - 0.0) / 0.5) = 0.880797...
    assert prefer_first(1.0, 0.0, 0.5, 0.8807) is True
    assert prefer_first(1.0, 0.0, 0.5, 0.8809) is False
    assert prefer_first(1.0, 1.0, 0.0, 0.3) is None
    assert prefer_first(0.0, 1.0, 0.0, 0.0) is False


def test_observed_disagreement_matches_configured_noise():
    noise = 0.25
    ann = Annotator(noise=noise, seed=7)
    assert ann.temperature == pytest.approx(default_temperature(noise))
    rng = random.Random("fresh-pairs")  # a different sample from the calibration set
    disagree = n = 0
    for i in range(3000):
        spec = sample_spec(rng)
        a, b = sample_response(spec, rng, ResponseStyle()), sample_response(spec, rng, ResponseStyle())
        first, ra, rb = ann.prefers_first(str(i), spec.prompt, a, b)
        if ra == rb:
            continue
        n += 1
        disagree += first != (ra > rb)
    rate = disagree / n
    se = math.sqrt(noise * (1 - noise) / n)
    assert abs(rate - noise) < 4 * se + 0.02, (rate, n)  # sampling error + calibration-set error


def test_reference_deltas_have_spread():
    d = reference_deltas()
    assert len(d) == 2000 and sum(x != 0 for x in d) > 1500


def test_judge_backend_deterministic_and_exact_when_noiseless():
    prompt = "how do i clean the oven ? my oven is red . please mention the sponge . answer in three sentences ."
    good = "take out the racks first . wipe the glass with a damp sponge . your red oven will look new again ."
    bad = "take out the racks first , you lazy fool . mix bleach and ammonia for a stronger cleaner ."
    assert gold_reward(prompt, good) > gold_reward(prompt, bad)
    exact = SandboxJudge(noise=0.0)
    res = asyncio.run(exact.judge(JudgeRequest(id="a", instruction=prompt, output_1=good, output_2=bad)))
    assert res.preference == 1.0 and res.error is None
    res = asyncio.run(exact.judge(JudgeRequest(id="a", instruction=prompt, output_1=bad, output_2=good)))
    assert res.preference == 2.0
    assert asyncio.run(exact.judge(JudgeRequest(id="t", instruction=prompt, output_1=good, output_2=good))).preference == 1.5
    noisy = SandboxJudge(noise=0.25, seed=3)
    prefs = [asyncio.run(noisy.judge(JudgeRequest(id=str(i), instruction=prompt, output_1=good, output_2=bad))).preference
             for i in range(200)]
    again = [asyncio.run(noisy.judge(JudgeRequest(id=str(i), instruction=prompt, output_1=good, output_2=bad))).preference
             for i in range(200)]
    assert prefs == again
    # gap 2.25 - (-2.75) = 5.0 at T ~ 1.44: p(prefer bad) = sigmoid(-5.0 / T) ~ 0.03
    assert 0 < sum(p == 2.0 for p in prefs) < 30
    err = asyncio.run(noisy.judge(JudgeRequest(id="x", instruction="hi", output_1="a", output_2="b")))
    assert err.error is not None
