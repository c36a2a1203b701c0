"""The oracle minimal editor: rewrite exactly the flawed spans of a response, nothing else.

Each flaw is replaced by a good text of the same role, chosen deterministically:

- a rude clause -> the polite clause of the same rank; a rude opener -> the polite opener of the
  same rank when it opens the response (elsewhere it is a wholly flawed sentence, below);
- a contradicted colour -> the prompt's colour;
- an unsafe, off-topic, repeated or garbled sentence -> a fresh good sentence of the task: the
  requested item's sentence when the response does not cover it yet, else the first step (then
  item step, then fact) the response does not contain yet.

The number of sentences is kept, so every edit strictly raises the gold reward of a flawed
response (each flaw costs at least 0.5 and no term can drop), and a response without flaws is
returned unchanged. Only if a response has used up every good sentence of its task (more than
a dozen sentences) is a wholly flawed sentence deleted instead.
"""
from __future__ import annotations

from dataclasses import dataclass

from .domain import GOOD_OPENERS, POLITE_CLAUSES, RUDE_CLAUSES, RUDE_OPENERS, Sentence, Spec, parse_prompt, parse_response


@dataclass(frozen=True)
class Replacement:
    """Replace ``response[start:end]`` by ``text`` (the flaw it fixes is ``kind``)."""

    start: int
    end: int
    text: str
    kind: str


def _fresh_sentences(spec: Spec, sentences: list[Sentence], response: str) -> list[str]:
    """Good sentences (with their ' .') the response does not contain, best first."""
    present = {s.key for s in sentences if s.key is not None and not s.whole_flaw}
    covered = any(s.kind == "item" and s.item == spec.item and not s.whole_flaw for s in sentences)
    t = spec.topic
    items = sorted(t.items.items())
    candidates: list[tuple[tuple, str]] = []
    if not covered:
        idx = [w for w, _ in items].index(spec.item)
        candidates.append(((t.name, "item", idx), t.items[spec.item]))
    candidates += [((t.name, "step", i), s) for i, s in enumerate(t.steps)]
    candidates += [((t.name, "item", i), s) for i, (w, s) in enumerate(items) if w != spec.item]
    candidates += [((t.name, "fact", i), f.format(c=spec.colour)) for i, f in enumerate(t.facts)]
    out, seen = [], set(present)
    for key, text in candidates:
        if key not in seen:
            seen.add(key)
            out.append(text + " .")
    return out


def oracle_replacements(prompt: str | Spec, response: str) -> list[Replacement]:
    """The replacements that fix every flaw of ``response`` (sorted, non-overlapping)."""
    spec = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    sentences = parse_response(spec, response)
    fresh = iter(_fresh_sentences(spec, sentences, response))
    out: list[Replacement] = []
    for pos, s in enumerate(sentences):
        for f in s.flaws:
            old = response[f.start:f.end]
            if s.kind == "rude_opener" and pos == 0:
                new = GOOD_OPENERS[RUDE_OPENERS.index(old[:-2])] + " ."
            elif f.kind == "rude" and s.kind != "rude_opener":
                new = POLITE_CLAUSES[RUDE_CLAUSES.index(old) % len(POLITE_CLAUSES)] if old in RUDE_CLAUSES \
                    else POLITE_CLAUSES[0]
            elif f.kind == "contradiction":
                new = spec.colour
            else:
                new = next(fresh, None)
                if new is None:  # nothing good left to say: delete the sentence (and one space beside it)
                    start, end = f.start, f.end
                    if end < len(response) and response[end] == " ":
                        end += 1
                    elif start > 0 and response[start - 1] == " ":
                        start -= 1
                    out.append(Replacement(start, end, "", f.kind))
                    continue
            out.append(Replacement(f.start, f.end, new, f.kind))
    return out


def apply_replacements(text: str, reps: list[Replacement]) -> str:
    out, pos = [], 0
    for r in sorted(reps, key=lambda r: r.start):
        out.append(text[pos:r.start])
        out.append(r.text)
        pos = r.end
    out.append(text[pos:])
    return "".join(out)


def oracle_edit(prompt: str | Spec, response: str) -> str:
    """``response`` with exactly its flawed spans rewritten into good text."""
    return apply_replacements(response, oracle_replacements(prompt, response))
