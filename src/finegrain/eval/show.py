"""Per-token rewards as an HTML heat map (`finegrain show-rewards`; reused by the sandbox report).

Each token is shaded on a diverging scale around a stated centre: red below it (the lower, the
redder: "this token looks flawed"), blue above it, white at it. The centre is the reward model's
flaw threshold (chosen by train-rm on its own training-side pairs, stored in finegrain.json) when
it has one, else the median reward on the page; the scale's half-width is the 95th percentile of
|reward - centre| on the page, so one extreme token does not wash out the rest. A legend gives the
colours with their rewards. Changed (U1) tokens are outlined, gold flawed tokens (when the data
has ``gold_spans``) underlined. All model and user text is HTML-escaped. Importing this module
is cheap; the model is only loaded inside :func:`show_rewards`.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Sequence

from ..config import ModelOptions, opt
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
.prompt{white-space:pre-wrap;overflow-wrap:anywhere;color:#555;background:#f6f6f6;padding:.4em;border-radius:4px}
.resp{white-space:pre-wrap;overflow-wrap:anywhere;line-height:1.9;font-family:ui-monospace,monospace;font-size:.9em}
.tok{border-radius:2px;padding:1px 0}
.u1{outline:2px solid #1f4fff;outline-offset:0}
.gold{text-decoration:underline dotted #000 2px}
.special{font-size:.75em;color:#666}
.zw{display:inline-block;min-width:.35em;height:1em;vertical-align:middle}
.legend span{padding:.1em .4em;margin-right:.2em;font-family:ui-monospace,monospace;font-size:.85em}
h2{font-size:1em;margin:.3em 0} h3{font-size:.9em;margin:.6em 0 .2em}
"""


LOW_RGB, HIGH_RGB = (215, 48, 39), (69, 117, 180)   # ColorBrewer RdBu ends: red = low reward, blue = high


def reward_colour(r: float, centre: float, scale: float) -> str:
    """Background of a token: white at ``centre``, towards red below it and blue above, full at +-``scale``.

    Colours stop at 85 % of the end colour so black text stays readable on them.

    >>> reward_colour(-1.0, 0.0, 1.0), reward_colour(0.0, 0.0, 1.0), reward_colour(2.0, 1.0, 2.0)
    ('rgb(221,79,71)', 'rgb(255,255,255)', 'rgb(176,196,223)')
    """
    gap = r - centre
    t = gap / scale if scale > 0 and math.isfinite(r) and not math.isnan(gap) else 0.0
    t = max(-1.0, min(1.0, t)) if not math.isnan(t) else math.copysign(1.0, gap)  # inf / inf: a full end colour
    end = LOW_RGB if t < 0 else HIGH_RGB
    w = abs(t) * 0.85
    return "rgb({},{},{})".format(*(round(255 + (c - 255) * w) for c in end))


def colour_scale(rewards: Sequence[float], centre: float) -> float:
    """Half-width of the colour scale: the 95th percentile of |r - centre| (robust to a few extreme tokens)."""
    gaps = sorted(abs(r - centre) for r in rewards if math.isfinite(r))
    if not gaps:
        return 0.0
    return gaps[min(len(gaps) - 1, int(0.95 * len(gaps)))] or gaps[-1]


def _response_html(v: ResponseView, centre: float, scale: float) -> str:
    parts, prev = [], 0
    for k, ((s, e), r) in enumerate(zip(v.offsets, v.rewards)):
        if s > prev:
            parts.append(html.escape(v.text[prev:s]))
        # a zero-width position is the closing token (the last position, shown by name) or, inside the text, a
        # token whose characters a tokenizer trimmed from its offsets (a lone space): shown as a thin box. The
        # byte-level pieces of one character all have its offsets: the first shows it, the others show nothing
        closing = e == s and s >= len(v.text) and k == len(v.offsets) - 1
        a = max(s, prev)
        shown = v.text[a:e] if e > a else (v.tokens[k] if closing else "")
        classes = ["tok"] + (["u1"] if k < len(v.changed) and v.changed[k] else []) \
            + (["gold"] if k < len(v.gold) and v.gold[k] else []) + (["special"] if closing else []) \
            + (["zw"] if e == s and not closing else [])
        parts.append(f'<span class="{" ".join(classes)}" style="background:{reward_colour(r, centre, scale)}" '
                     f'title="reward {r:+.4f}">{html.escape(shown)}</span>')
        prev = max(prev, e)
    if prev < len(v.text):
        parts.append(html.escape(v.text[prev:]))
    score = "" if v.score is None else f" &middot; score {v.score:+.4f}"
    return f'<h3>{html.escape(v.label)}{score}</h3><div class="resp">{"".join(parts)}</div>'


def legend_html(centre: float, scale: float, centre_label: str) -> str:
    """The colour key: nine swatches from centre - scale to centre + scale with their rewards."""
    steps = [centre + scale * k / 4 for k in range(-4, 5)]
    swatches = "".join(f'<span style="background:{reward_colour(r, centre, scale)}">{r:+.2f}</span>' for r in steps)
    return (f'<div class="legend"><p>reward: {swatches}</p><p>red = below the centre {centre:+.3f} '
            f'({html.escape(centre_label)}): the reward model calls the token flawed; blue = above it; '
            f'<span class="u1">outlined</span> = changed by the edit (U1); <span class="gold">underlined</span> '
            f'= gold flawed span</p></div>')


def token_reward_html(items: Sequence[PairView], *, title: str = "Per-token rewards", centre: float | None = None,
                      centre_label: str = "the flaw threshold") -> str:
    """A self-contained HTML page showing every response of every item as a reward heat map.

    ``centre`` None: the median reward on the page (said so in the legend).
    """
    rewards = [r for it in items for v in it.responses for r in v.rewards if math.isfinite(r)]
    if centre is None or not math.isfinite(centre):
        centre = sorted(rewards)[len(rewards) // 2] if rewards else 0.0
        centre_label = "the median reward on this page"
    scale = colour_scale(rewards, centre)
    body = []
    for it in items:
        resp = "".join(_response_html(v, centre, scale) for v in it.responses)
        body.append(f'<div class="pair"><h2>{html.escape(str(it.id))}</h2>'
                    f'<div class="prompt">{html.escape(it.prompt)}</div>{resp}</div>')
    legend = legend_html(centre, scale, centre_label)
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{legend}{"".join(body)}</body></html>\n')


@dataclass(kw_only=True)
class ShowRewardsConfig(ModelOptions):
    """HTML page of the per-token rewards of a token reward model on some pairs."""

    model: str = opt(help="token reward model directory written by `finegrain train-rm`")
    data: str = opt(help="pairs to show: .jsonl/.json/.jsonl.gz/.parquet or a `datasets` name")
    output: str = opt(help="HTML file to write")
    n: int = opt(20, "number of pairs to show (the first N)")
    pairs: str = opt("edit", "preference: chosen vs rejected; edit: edited vs rejected", choices=["preference", "edit"])
    batch_size: int = opt(16, "responses per forward pass", ge=1)
    max_length: int | None = opt(None, "maximum tokens per input (default: the model's training value)", ge=1)
    skip_invalid: bool = opt(False, "skip invalid records instead of stopping")
    mark_changed: bool = opt(True, "outline the tokens the edit changed (turn off for pairs that are not edits, "
                                   "e.g. two independent samples, where nearly every token differs)")

    def validate(self) -> None:
        super().validate()
        if self.n < 1:
            raise ConfigError("--n must be >= 1")


def _views(rm, items, batch_size: int = 16, mark_changed: bool = True) -> list[PairView]:
    from ..rm.align import align_tokens, spans_to_token_mask

    prompts = [c.prompt for c in items]
    better = rm.token_rewards(prompts, [c.better for c in items], batch_size=batch_size)
    worse = rm.token_rewards(prompts, [c.worse for c in items], batch_size=batch_size)
    out = []
    for c, tb, tw in zip(items, better, worse):
        al = align_tokens(rm.encode(c.prompt, c.worse).response_ids, rm.encode(c.prompt, c.better).response_ids)
        if not mark_changed:
            al.changed_edited, al.changed_original = [], []
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
        from ..rm.losses import loss_names  # every token loss, as declared: the hint never falls behind them

        raise ConfigError(f"{cfg.model} is a sequence reward model; show-rewards needs a token reward model "
                          f"(train one with --loss {', '.join(loss_names(kind='token'))})")
    centre = rm.meta.get("flaw_threshold")
    page = token_reward_html(_views(rm, items, cfg.batch_size, cfg.mark_changed), title=f"Per-token rewards of {cfg.model}",
                             centre=centre, centre_label="the flaw threshold train-rm chose on its training pairs")
    with atomic_write(cfg.output) as f:
        f.write(page)
    return {"output": cfg.output, "n_pairs": len(items)}
