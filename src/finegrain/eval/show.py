"""Per-token rewards as an HTML heat map (`finegrain show-rewards`; reused by the sandbox report).

Each token is shaded by its reward: red below zero, green above, intensity relative to the
largest |reward| on the page. Changed (U1) tokens are outlined, gold flawed tokens (when the data
has ``gold_spans``) underlined. All model and user text is HTML-escaped. Importing this module
is cheap; the model is only loaded inside :func:`show_rewards`.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Sequence

from ..config import opt
from ..errors import ConfigError


@dataclass
class ResponseView:
    """One response with its per-position rewards.

    text:     the response text; tokens are cut out of it by ``offsets`` (the text between two
              tokens, e.g. a space a tokenizer trimmed, is shown unshaded)
    tokens:   display text per position (used for zero-width positions such as the closing EOS)
    offsets:  (start, end) character offsets of each position in ``text``
    rewards:  one reward per position
    changed:  True = U1 token (outlined); empty = none
    gold:     True = gold flawed token (underlined); empty = none
    score:    the response's score (Eq. 1 mean for a token RM), shown in the heading
    """

    label: str
    text: str
    tokens: list[str]
    offsets: list[tuple[int, int]]
    rewards: list[float]
    changed: list[bool] = field(default_factory=list)
    gold: list[bool] = field(default_factory=list)
    score: float | None = None


@dataclass
class PairView:
    id: str
    prompt: str
    responses: list[ResponseView]


_CSS = """
body{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em;color:#222}
.pair{border:1px solid #ccc;border-radius:6px;padding:.5em 1em;margin:1em 0}
.prompt{white-space:pre-wrap;color:#555;background:#f6f6f6;padding:.4em;border-radius:4px}
.resp{white-space:pre-wrap;line-height:1.9;font-family:ui-monospace,monospace;font-size:.9em}
.tok{border-radius:2px;padding:1px 0}
.u1{outline:2px solid #1f4fff;outline-offset:0}
.gold{text-decoration:underline dotted #000 2px}
.special{font-size:.75em;color:#666}
.zw{display:inline-block;min-width:.35em;height:1em;vertical-align:middle}
.legend span{padding:0 .4em;margin-right:.3em}
h2{font-size:1em;margin:.3em 0} h3{font-size:.9em;margin:.6em 0 .2em}
"""


def reward_colour(r: float, scale: float) -> str:
    """Background colour of a token: red for negative, green for positive rewards."""
    t = max(-1.0, min(1.0, r / scale)) if scale > 0 and math.isfinite(r) else 0.0
    rgb = (214, 39, 40) if t < 0 else (44, 160, 44)
    return f"rgba({rgb[0]},{rgb[1]},{rgb[2]},{abs(t) * 0.85:.3f})"


def _response_html(v: ResponseView, scale: float) -> str:
    parts, prev = [], 0
    for k, ((s, e), r) in enumerate(zip(v.offsets, v.rewards)):
        if s > prev:
            parts.append(html.escape(v.text[prev:s]))
        # a zero-width position is the closing token (shown by name) or, inside the text, a token
        # whose characters a tokenizer trimmed from its offsets (a lone space): shown as a thin box
        closing = e == s and s >= len(v.text)
        shown = v.text[s:e] if e > s else (v.tokens[k] if closing else "")
        classes = ["tok"] + (["u1"] if k < len(v.changed) and v.changed[k] else []) \
            + (["gold"] if k < len(v.gold) and v.gold[k] else []) + (["special"] if closing else []) \
            + (["zw"] if e == s and not closing else [])
        parts.append(f'<span class="{" ".join(classes)}" style="background:{reward_colour(r, scale)}" '
                     f'title="reward {r:+.4f}">{html.escape(shown)}</span>')
        prev = max(prev, e)
    if prev < len(v.text):
        parts.append(html.escape(v.text[prev:]))
    score = "" if v.score is None else f" &middot; score {v.score:+.4f}"
    return f'<h3>{html.escape(v.label)}{score}</h3><div class="resp">{"".join(parts)}</div>'


def token_reward_html(items: Sequence[PairView], *, title: str = "Per-token rewards") -> str:
    """A self-contained HTML page showing every response of every item as a reward heat map."""
    rewards = [abs(r) for it in items for v in it.responses for r in v.rewards if math.isfinite(r)]
    scale = max(rewards, default=0.0)
    body = []
    for it in items:
        resp = "".join(_response_html(v, scale) for v in it.responses)
        body.append(f'<div class="pair"><h2>{html.escape(str(it.id))}</h2>'
                    f'<div class="prompt">{html.escape(it.prompt)}</div>{resp}</div>')
    legend = (f'<p class="legend">colour scale &plusmn;{scale:.4f}: '
              f'<span style="background:{reward_colour(-scale, scale)}">low reward</span>'
              f'<span style="background:{reward_colour(scale, scale)}">high reward</span>'
              f'<span class="u1">changed by the edit (U1)</span><span class="gold">gold flawed</span></p>')
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{legend}{"".join(body)}</body></html>\n')


@dataclass
class ShowRewardsConfig:
    """HTML page of the per-token rewards of a token reward model on some pairs."""

    model: str = opt(help="token reward model directory written by `finegrain train-rm`")
    data: str = opt(help="pairs to show: .jsonl/.json/.jsonl.gz/.parquet or a `datasets` name")
    output: str = opt(help="HTML file to write")
    n: int = opt(20, "number of pairs to show (the first N)")
    pairs: str = opt("edit", "preference: chosen vs rejected; edit: edited vs rejected", choices=["preference", "edit"])
    batch_size: int = opt(16, "responses per forward pass")
    max_length: int | None = opt(None, "maximum tokens per input (default: the model's training value)")
    skip_invalid: bool = opt(False, "skip invalid records instead of stopping")
    trust_remote_code: bool = opt(False, "allow model code from the hub")

    def validate(self) -> None:
        if self.n < 1:
            raise ConfigError("--n must be >= 1")


def _views(rm, items, batch_size: int = 16) -> list[PairView]:
    from ..rm.align import align_tokens, spans_to_token_mask

    prompts = [c.prompt for c in items]
    better = rm.token_rewards(prompts, [c.better for c in items], batch_size=batch_size)
    worse = rm.token_rewards(prompts, [c.worse for c in items], batch_size=batch_size)
    out = []
    for c, tb, tw in zip(items, better, worse):
        al = align_tokens(rm.encode(c.prompt, c.worse).response_ids, rm.encode(c.prompt, c.better).response_ids)
        gold = spans_to_token_mask(tw.offsets, c.gold_spans) if c.gold_spans else []
        mean = lambda r: sum(r) / max(len(r), 1)  # noqa: E731  (Eq. 1)
        out.append(PairView(c.id, c.prompt, [
            ResponseView("better", c.better, tb.tokens, tb.offsets, tb.rewards, al.changed_edited, [],
                         mean(tb.rewards)),
            ResponseView("worse", c.worse, tw.tokens, tw.offsets, tw.rewards, al.changed_original, gold,
                         mean(tw.rewards))]))
    return out


def show_rewards(cfg: ShowRewardsConfig) -> dict:
    """Write the heat-map page of ``cfg.model`` on the first ``cfg.n`` pairs of ``cfg.data``."""
    from ..io import atomic_write
    from ..rm.data import load_comparisons
    from ..rm.model import RewardModel

    items = load_comparisons(cfg.data, cfg.pairs, skip_invalid=cfg.skip_invalid)[: cfg.n]
    rm = RewardModel.load(cfg.model, trust_remote_code=cfg.trust_remote_code, max_length=cfg.max_length)
    if rm.kind != "token":
        raise ConfigError(f"{cfg.model} is a sequence reward model; show-rewards needs a token reward model "
                          "(train one with --loss token_edit or token_mean)")
    page = token_reward_html(_views(rm, items, cfg.batch_size), title=f"Per-token rewards of {cfg.model}")
    with atomic_write(cfg.output) as f:
        f.write(page)
    return {"output": cfg.output, "n_pairs": len(items)}
