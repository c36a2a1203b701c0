"""Simulated annotators: noisy Bradley-Terry preferences from the gold reward.

An annotator shown responses a and b prefers a with probability

    p(a > b) = sigmoid((R(a) - R(b)) / T)

(AlpacaFarm's simulated annotators add label noise the same way). The temperature T is set
from a target NOISE: the expected fraction of labels that disagree with the gold order, over
pairs whose gold rewards differ. AlpacaFarm measured about 25% disagreement between human
annotators, hence the default 0.25. Because that fraction depends on how far apart the two
responses of a pair are, T is calibrated by bisection on a reference set of pairs of the
domain's demonstrations (:func:`reference_deltas`; the demo calibrates on its own pairs
instead and records the T it used). Ties in gold reward are labelled by a fair coin when T > 0
(sigmoid(0) = 1/2); at T = 0 (NOISE 0) they stay ties: the judge scores half a win, and the demo's
pair labelling keeps sample a as chosen (a draw independent of b, so no side is favoured).

Every random draw is keyed by (seed, item id, texts), so a label never depends on the order
or concurrency in which pairs are annotated.
"""
from __future__ import annotations

import hashlib
import math
import random
from functools import lru_cache
from typing import Sequence

from .domain import ResponseStyle, gold_reward, sample_response, sample_spec


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def expected_disagreement(deltas: Sequence[float], temperature: float) -> float:
    """Mean probability of preferring the lower-reward response, over pairs with delta != 0."""
    d = [abs(x) for x in deltas if x != 0]
    if not d:
        return 0.0
    if temperature <= 0:
        return 0.0
    return sum(sigmoid(-x / temperature) for x in d) / len(d)


def calibrate_temperature(deltas: Sequence[float], noise: float, *, iters: int = 60) -> float:
    """The BT temperature whose expected disagreement on ``deltas`` equals ``noise`` (0 <= noise < 0.5)."""
    if not 0.0 <= noise < 0.5:
        raise ValueError(f"noise must be in [0, 0.5), got {noise}")
    if noise == 0.0 or not any(deltas):
        return 0.0
    lo, hi = 1e-6, 1.0
    while expected_disagreement(deltas, hi) < noise:  # disagreement grows with T towards 0.5
        hi *= 2.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if expected_disagreement(deltas, mid) < noise:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@lru_cache(maxsize=8)
def reference_deltas(n: int = 2000, seed: int = 12345, flaw_rate: float = 0.3) -> tuple[float, ...]:
    """Gold-reward differences of ``n`` pairs of independent demonstrations for the same prompt."""
    rng = random.Random(f"reference-{seed}")
    style = ResponseStyle(flaw_rate=flaw_rate)
    out = []
    for _ in range(n):
        spec = sample_spec(rng)
        a, b = sample_response(spec, rng, style), sample_response(spec, rng, style)
        out.append(gold_reward(spec, a) - gold_reward(spec, b))
    return tuple(out)


@lru_cache(maxsize=32)
def default_temperature(noise: float) -> float:
    """T that gives ``noise`` disagreement on :func:`reference_deltas`."""
    return calibrate_temperature(reference_deltas(), noise)


def keyed_uniform(*parts: object) -> float:
    """A uniform number in [0, 1) that depends only on ``parts`` (stable across runs and platforms)."""
    h = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0 ** 64


def prefer_first(r1: float, r2: float, temperature: float, u: float) -> bool | None:
    """True if a BT annotator with temperature T prefers 1 over 2 given the uniform draw ``u``.

    None (a tie) only when T == 0 and the rewards are equal.
    """
    if temperature <= 0:
        if r1 == r2:
            return None
        return r1 > r2
    return u < sigmoid((r1 - r2) / temperature)


class Annotator:
    """Noisy BT preferences from the gold reward of a sandbox prompt."""

    def __init__(self, noise: float = 0.25, seed: int = 0, temperature: float | None = None):
        self.noise = noise
        self.seed = seed
        self.temperature = default_temperature(noise) if temperature is None else float(temperature)

    def prefers_first(self, key: str, prompt: str, a: str, b: str) -> tuple[bool | None, float, float]:
        """(a preferred?, R(a), R(b)); the draw depends on (seed, key, a, b) only."""
        ra, rb = gold_reward(prompt, a), gold_reward(prompt, b)
        u = keyed_uniform("bt", self.seed, key, prompt, a, b)
        return prefer_first(ra, rb, self.temperature, u), ra, rb
