"""Token and cost accounting for a run of backend calls (module ``finegrain.llm.accounting``).

Prices are USD per million tokens ``[input, output]``, looked up by the longest prefix of the
model name in a price table (the packaged ``prices.yaml``, or a user YAML of the same shape),
unless both prices are given explicitly. Backends registered as not priced (``hf``, ``file``, the
sandbox; see :func:`finegrain.llm.backends.register_backend`) cost nothing. Costs are split into what
this run paid (``tokens`` / ``cost_usd``) and what answers served from the cache had cost when
first paid (``cached_tokens`` / ``cached_cost_usd``, i.e. what the cache saved).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Iterable

import yaml

from ..errors import InputError
from ..io import read_yaml
from .backends import find_backend
from .interfaces import is_answered


def load_price_table(path: str | None = None) -> dict[str, tuple[float, float]]:
    """``{model_prefix: (input, output)}`` USD per million tokens from the YAML at ``path`` (default: the
    packaged table): a mapping of model-prefix to ``[input, output]``, finite numbers >= 0. Anything else is
    an :class:`InputError` naming the file and the key."""
    if path:
        data = read_yaml(path, "price table")
    else:
        data = yaml.safe_load(resources.files("finegrain.llm").joinpath("prices.yaml").read_text(encoding="utf-8"))
    where = path or "prices.yaml"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError(f"a price table must be a mapping of model-prefix: [input, output] USD per million tokens, "
                         f"got {type(data).__name__}", path=where)
    out = {}
    for model, pair in data.items():
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in pair)):
            raise InputError(f"expected [input_usd_per_mtok, output_usd_per_mtok], got {pair!r}", path=where,
                             field=str(model))
        if not all(math.isfinite(x) and x >= 0 for x in pair):
            raise InputError(f"prices must be finite numbers >= 0, got {list(pair)!r}", path=where, field=str(model))
        out[str(model)] = (float(pair[0]), float(pair[1]))
    return out


def lookup_price(backend: str, model: str, table: dict[str, tuple[float, float]], price_input: float | None = None,
                 price_output: float | None = None) -> tuple[float, float] | None:
    """``(input, output)`` USD per million tokens for ``model``, or None when unknown."""
    spec = find_backend(backend)
    if spec is not None and not spec.priced:
        return (0.0, 0.0)
    if price_input is not None and price_output is not None:
        return (price_input, price_output)
    matches = [k for k in table if model.startswith(k)]
    if not matches:
        return None
    found = table[max(matches, key=len)]
    return (price_input if price_input is not None else found[0], price_output if price_output is not None else found[1])


def cost_usd(price: tuple[float, float] | None, input_tokens: int, output_tokens: int) -> float | None:
    if price is None:
        return None
    return round((input_tokens * price[0] + output_tokens * price[1]) / 1e6, 6)


@dataclass
class Usage:
    """Counts of calls and tokens, paid this run vs served from the cache."""

    price: tuple[float, float] | None
    requests: int = 0
    attempts: int = 0
    cached: int = 0
    failed: int = 0
    tokens: dict[str, int] = field(default_factory=lambda: {"input": 0, "output": 0})
    cached_tokens: dict[str, int] = field(default_factory=lambda: {"input": 0, "output": 0})

    def add(self, outcomes: Iterable[Any]) -> "Usage":
        for o in outcomes:
            if o.result is not None:
                bucket = self.cached_tokens if o.cached else self.tokens
                bucket["input"] += int(getattr(o.result, "input_tokens", 0) or 0)
                bucket["output"] += int(getattr(o.result, "output_tokens", 0) or 0)
            if o.result is None or not is_answered(o.result):  # every attempt failed, or a per-item failure
                self.failed += 1
                self.attempts += o.attempts
            elif o.cached:
                self.cached += 1
            else:
                self.requests += 1
                self.attempts += o.attempts
        return self

    def summary(self) -> dict[str, Any]:
        return {
            "n_requests": self.requests, "n_attempts": self.attempts, "n_cached": self.cached,
            "n_failed": self.failed, "tokens": dict(self.tokens), "cached_tokens": dict(self.cached_tokens),
            "price_usd_per_mtok": list(self.price) if self.price else None,
            "cost_usd": cost_usd(self.price, self.tokens["input"], self.tokens["output"]),
            "cached_cost_usd": cost_usd(self.price, self.cached_tokens["input"], self.cached_tokens["output"]),
        }
