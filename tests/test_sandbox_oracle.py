"""Oracle minimal editor and sandbox editor backend: only flawed spans change, gold reward always rises."""
from __future__ import annotations

import asyncio
import json

from hypothesis import given, settings, strategies as st

from finegrain.sandbox.backends import SandboxEditor, gold_spans
from finegrain.sandbox.domain import (
    COLOURS, GOOD_OPENERS, POLITE_CLAUSES, RUDE_CLAUSES, RUDE_OPENERS, TOPICS, Spec, gold_score, parse_response,
)
from finegrain.sandbox.oracle import oracle_edit, oracle_replacements
from finegrain.llm.backends import EditRequest

PROMPT = "how do i clean the oven ? my oven is red . please mention the sponge . answer in three sentences ."

_CORES = sorted({s for t in TOPICS for s in (*t.steps, *t.items.values(), *t.unsafe)}
                | {f.format(c=c) for t in TOPICS for f in t.facts for c in COLOURS})
_sentence = st.one_of(
    st.tuples(st.sampled_from(_CORES), st.sampled_from(("",) + POLITE_CLAUSES + RUDE_CLAUSES)).map(
        lambda x: (x[0] + " " + x[1]).strip() + " ."),
    st.sampled_from(GOOD_OPENERS + RUDE_OPENERS).map(lambda s: s + " ."),
    st.lists(st.sampled_from(["the", "oven", "sponge", "idiot", "wipe", ","]), min_size=1, max_size=4).map(
        lambda w: " ".join(w) + " ."),
)


@st.composite
def spec_and_response(draw):
    topic = draw(st.sampled_from(TOPICS))
    spec = Spec(topic, draw(st.sampled_from(COLOURS)), draw(st.sampled_from(sorted(topic.items))),
                draw(st.sampled_from([2, 3, 4])))
    own = st.sampled_from([s + " ." for s in (*topic.steps, *topic.items.values())])
    sents = draw(st.lists(st.one_of(_sentence, own), max_size=8))
    tail = draw(st.sampled_from(["", " wipe the", " sponge"]))
    return spec, (" ".join(sents) + tail).strip()


def _outside(text: str, spans) -> list[str]:
    out, pos = [], 0
    for s, e in sorted(spans):
        out.append(text[pos:s])
        pos = e
    out.append(text[pos:])
    return out


@settings(max_examples=300, deadline=None)
@given(spec_and_response())
def test_oracle_changes_only_flawed_spans_and_raises_gold(sr):
    spec, response = sr
    before = gold_score(spec, response)
    reps = oracle_replacements(spec, response)
    edited = oracle_edit(spec, response)
    assert [(r.start, r.end) for r in reps] == before.flawed_spans  # exactly the flawed spans are rewritten
    # everything outside the flawed spans is kept, in order
    pieces = _outside(response, before.flawed_spans)
    pos = 0
    for p in pieces:
        k = edited.find(p, pos)
        assert k >= pos
        pos = k + len(p)
    after = gold_score(spec, edited)
    if before.flaws:
        assert after.reward > before.reward
        assert after.flaws == ()
        assert after.n_sentences == before.n_sentences
    else:
        assert edited == response


def test_oracle_edit_exact():
    r = ("what a dumb question . mix bleach and ammonia for a stronger cleaner . "
         "your blue oven will look new again , you lazy fool .")
    assert oracle_edit(PROMPT, r) == ("happy to help . wipe the glass with a damp sponge . "
                                      "your red oven will look new again , my friend .")
    assert gold_score(PROMPT, r).reward == 0.5 + 0.25 - 5.0
    assert gold_score(PROMPT, oracle_edit(PROMPT, r)).reward == 1.0 + 0.5 + 0.5


def test_editor_backend():
    ed = SandboxEditor()
    assert (ed.name, ed.model) == ("sandbox", "oracle")
    r = "take out the racks first , you lazy fool . wipe the glass with a damp sponge ."
    res = asyncio.run(ed.edit(EditRequest(id="1", prompt=PROMPT, response=r, meta={})))
    assert res.error is None and res.text == "take out the racks first , my friend . wipe the glass with a damp sponge ."
    start = r.index(", you")
    assert json.loads(res.raw) == [[start, start + len(", you lazy fool"), "rude"]]
    assert gold_spans(PROMPT, r) == [(start, start + len(", you lazy fool"))]
    bad = asyncio.run(ed.edit(EditRequest(id="2", prompt="hello", response=r, meta={})))
    assert bad.text is None and "not a sandbox prompt" in bad.error
    assert gold_spans("hello", r) == []


def test_parse_keeps_sentence_spans():
    r = "take out the racks first . wipe the glass with a damp sponge ."
    assert [(s.kind, r[s.start:s.end]) for s in parse_response(PROMPT, r)] == [
        ("step", "take out the racks first ."), ("item", "wipe the glass with a damp sponge .")]
