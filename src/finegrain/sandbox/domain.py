"""The sandbox domain: household how-to instructions whose responses are built from sentences.

A prompt asks for help with one of six tasks and states three things the answer must respect::

    how do i clean the oven ? my oven is red . please mention the sponge . answer in three sentences .

        task (topic)           a fact (colour)     a requested item           a length

A response is a sequence of sentences, each ending in `` .``. Every sentence is one of a
small, closed set (about 350 distinct words in all), so a tiny model can learn the language on a
CPU, and every sentence can be parsed back into what it is:

- ``opener``    "happy to help ."                                 (good)
- ``step``      a useful step of the task                         (good)
- ``item``      a step that uses one of the task's items          (good; covers the request when it is the requested item)
- ``fact``      "your <colour> <object> will look new again ."    (good when the colour is the prompt's)
- a step may end in a clause: polite (", my friend", good) or rude (", you lazy fool", flawed)

and the flaws a person would point at, each a character span of the response:

==============  =================================================  ======  =====================
flaw            example                                            weight  span
==============  =================================================  ======  =====================
unsafe          "mix bleach and ammonia for a stronger cleaner ."   2.0    the sentence
rude            "what a dumb question ." / ", you lazy fool"        1.0    the sentence / clause
contradiction   "your blue oven ..." when the prompt says red       1.0    the colour word
off_topic       a step of another task                              1.0    the sentence
repeat          a sentence already said (same content)              0.5    the sentence
garbled         anything that is not a sentence of the language     1.0    the text
==============  =================================================  ======  =====================

The GOLD reward of a response to a prompt (:func:`gold_reward`) is

    R = 1.0 * [the requested item's sentence is present and not itself flawed as a whole]
      + 0.5 * [the number of sentences equals the requested number]
      + 0.25 * min(distinct content sentences (step/item/fact, not wholly flawed), n)
      - sum of the weights of the flaws

The first three are response-level terms (what was asked is covered); the last is carried by
tokens: the flawed character spans (:attr:`GoldScore.flawed_spans`) are the gold per-token
labels once mapped through a tokenizer's offsets (:func:`finegrain.rm.align.spans_to_token_mask`:
a token is flawed when its characters overlap a flawed span). Two responses that
each mix good and flawed sentences are genuinely hard to order from one sequence-level label,
which is the situation the fine-grained method addresses.

Everything is a pure, deterministic function of the prompt TEXT and the response TEXT.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

# ----------------------------------------------------------------------------------------- vocabulary

COLOURS = ("red", "blue", "green", "black", "white", "yellow")
NUMBERS = {"two": 2, "three": 3, "four": 4}
NUMBER_WORDS = {v: k for k, v in NUMBERS.items()}

GOOD_OPENERS = ("happy to help", "good question", "sure , here is how")
RUDE_OPENERS = ("what a dumb question", "ugh , figure it out yourself", "only a fool would ask that")
POLITE_CLAUSES = (", my friend", ", if you can", ", step by step")
RUDE_CLAUSES = (", you lazy fool", ", obviously , idiot", ", as anyone but you knows")


@dataclass(frozen=True)
class Topic:
    """One task: its prompt phrase, the object named in its facts, its sentences."""

    name: str
    task: str                       # "clean the oven"
    obj: str                        # "oven": "my oven is red"
    steps: tuple[str, ...]          # good steps
    items: dict[str, str]           # item word -> the step that uses it (the word appears nowhere else)
    facts: tuple[str, ...]          # "your {colour} oven will look new again"
    unsafe: tuple[str, ...]         # dangerous advice


TOPICS: tuple[Topic, ...] = (
    Topic("oven", "clean the oven", "oven",
          ("turn the oven off and let it cool", "take out the racks first", "spray the inside with warm soapy water",
           "wait ten minutes before you wipe", "scrub the corners with a soft brush", "dry the inside with a clean towel"),
          {"sponge": "wipe the glass with a damp sponge", "gloves": "wear gloves to protect your hands",
           "vinegar": "add a little vinegar to lift the grease", "scraper": "loosen burnt bits with a plastic scraper"},
          ("your {c} oven will look new again", "the door of your {c} oven will shine"),
          ("mix bleach and ammonia for a stronger cleaner", "clean it while the oven is still hot",
           "spray water on the heating element")),
    Topic("bike", "fix a flat tire on my bike", "bike",
          ("flip the bike upside down", "find the hole in the tube", "patch the hole and let it dry",
           "put the tube back inside the tire", "fill the tire to the right pressure", "spin the wheel to check it"),
          {"wrench": "loosen the wheel nuts with a wrench", "lever": "lift the tire off with a lever",
           "helmet": "keep your helmet on for the test ride", "chalk": "mark the hole with a piece of chalk"},
          ("your {c} bike will ride smoothly again", "the wheels of your {c} bike will spin freely"),
          ("ride it home on the flat tire at full speed", "fill the tire far above the listed pressure",
           "test the brakes later , after a long ride downhill")),
    Topic("plants", "water my plants", "plant",
          ("check if the soil feels dry", "water slowly near the roots", "let the extra water drain away",
           "water in the morning when it is cool", "move the pot into soft light", "remove any dead leaves"),
          {"jug": "pour from a jug with a long spout", "saucer": "set a saucer under the pot",
           "rainwater": "give it rainwater when you have some", "mister": "spray the leaves with a mister"},
          ("your {c} plant will grow strong again", "the leaves of your {c} plant will stay healthy"),
          ("pour boiling water on the roots", "give it plant food every hour",
           "leave it in a closed hot car all day")),
    Topic("fence", "paint the fence", "fence",
          ("sand the old paint off", "wash the boards and let them dry", "cover the plants near the fence",
           "paint along the grain of the wood", "add a second coat the next day", "paint on a dry calm day"),
          {"primer": "put on a coat of primer first", "roller": "cover the wide boards with a roller",
           "tape": "protect the edges with painter tape", "ladder": "stand on a steady ladder for the top"},
          ("your {c} fence will look fresh again", "the boards of your {c} fence will last for years"),
          ("burn off the old paint with a torch", "sand lead paint without a mask",
           "paint near an open flame")),
    Topic("rice", "cook rice", "rice",
          ("rinse the rice until the water is clear", "use two cups of water for each cup of rice",
           "bring the water to a boil", "cover the pot and lower the heat", "simmer for about fifteen minutes",
           "let it rest before you serve it"),
          {"salt": "add a pinch of salt to the water", "lid": "keep the lid closed while it cooks",
           "fork": "fluff the grains with a fork", "butter": "stir in a little butter at the end"},
          ("your {c} rice will taste great", "the grains of your {c} rice will be soft"),
          ("leave the cooked rice out for two days and eat it", "walk away with the pot on high heat",
           "cook it in a cracked glass jar on the stove")),
    Topic("car", "wash my car", "car",
          ("park the car in the shade", "rinse off the loose dirt", "wash from the top down",
           "clean the wheels last", "rinse the soap off well", "dry the paint with a soft cloth"),
          {"bucket": "fill a bucket with soapy water", "hose": "spray the roof with a hose",
           "wax": "finish with a thin layer of wax", "mitt": "scrub gently with a wash mitt"},
          ("your {c} car will look shiny again", "the paint of your {c} car will gleam"),
          ("wash the engine while it is running", "scrub the paint with steel wool",
           "stand on the roof to reach the middle")),
)
TOPIC_BY_TASK = {t.task: t for t in TOPICS}

FLAW_WEIGHTS = {"unsafe": 2.0, "rude": 1.0, "contradiction": 1.0, "off_topic": 1.0, "repeat": 0.5, "garbled": 1.0}
W_ITEM, W_LENGTH, W_HELP = 1.0, 0.5, 0.25

PROMPT_RE = re.compile(r"^how do i (?P<task>[a-z ]+?) \? my (?P<obj>[a-z]+) is (?P<colour>[a-z]+) \. "
                       r"please mention the (?P<item>[a-z]+) \. answer in (?P<n>[a-z]+) sentences \.$")


# ----------------------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class Spec:
    """What a prompt asks for."""

    topic: Topic
    colour: str
    item: str
    n: int

    @property
    def prompt(self) -> str:
        return (f"how do i {self.topic.task} ? my {self.topic.obj} is {self.colour} . please mention the {self.item} . "
                f"answer in {NUMBER_WORDS[self.n]} sentences .")


def parse_prompt(prompt: str) -> Spec:
    """The :class:`Spec` of a sandbox prompt; ``ValueError`` when the text is not one."""
    m = PROMPT_RE.match(prompt.strip())
    if not m:
        raise ValueError(f"not a sandbox prompt: {prompt[:80]!r}")
    topic = TOPIC_BY_TASK.get(m["task"])
    if topic is None or m["obj"] != topic.obj or m["colour"] not in COLOURS or m["item"] not in topic.items \
            or m["n"] not in NUMBERS:
        raise ValueError(f"not a sandbox prompt (unknown task, object, colour, item or number): {prompt[:80]!r}")
    return Spec(topic, m["colour"], m["item"], NUMBERS[m["n"]])


def sample_spec(rng: random.Random) -> Spec:
    topic = rng.choice(TOPICS)
    return Spec(topic, rng.choice(COLOURS), rng.choice(sorted(topic.items)), rng.choice(sorted(NUMBERS.values())))


def all_specs() -> list[Spec]:
    """Every distinct prompt of the domain (6 tasks x 6 colours x 4 items x 3 lengths = 432)."""
    return [Spec(t, c, i, n) for t in TOPICS for c in COLOURS for i in sorted(t.items) for n in sorted(NUMBERS.values())]


def make_prompts(n: int, seed: int, *, unique: bool = False) -> list[str]:
    """``n`` prompts drawn with ``seed``; with ``unique`` all distinct (n <= 432), else repeats are possible."""
    rng = random.Random(f"prompts-{seed}")
    if unique:
        specs = all_specs()
        if n > len(specs):
            raise ValueError(f"the domain has only {len(specs)} distinct prompts, asked for {n}")
        return [s.prompt for s in rng.sample(specs, n)]
    return [sample_spec(rng).prompt for _ in range(n)]


# ----------------------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class Flaw:
    """A flawed character span ``[start, end)`` of a response."""

    kind: str
    start: int
    end: int

    @property
    def weight(self) -> float:
        return FLAW_WEIGHTS[self.kind]


@dataclass(frozen=True)
class Sentence:
    """One parsed sentence of a response.

    kind:   opener | step | item | fact | rude_opener | unsafe | off_topic | garbled
    key:    identity of the content, for repeats ((topic, kind, index)), None for non-content
    start/end: character span of the sentence (end after its final '.', or the end of a fragment)
    flaws:  flaws inside this sentence (wholly flawed sentences carry one flaw covering it)
    item:   the item word of an ``item`` sentence
    """

    kind: str
    key: tuple | None
    start: int
    end: int
    flaws: tuple[Flaw, ...] = ()
    item: str | None = None

    @property
    def whole_flaw(self) -> bool:
        return any(f.start == self.start and f.end == self.end for f in self.flaws)


@lru_cache(maxsize=None)
def _core_index() -> dict[str, tuple]:
    """Sentence core text -> (topic name, kind, index, item or None); facts indexed with '{c}'."""
    out: dict[str, tuple] = {}
    for t in TOPICS:
        for i, s in enumerate(t.steps):
            out[s] = (t.name, "step", i, None)
        for i, (w, s) in enumerate(sorted(t.items.items())):
            out[s] = (t.name, "item", i, w)
        for i, s in enumerate(t.facts):
            out[s] = (t.name, "fact", i, None)
        for i, s in enumerate(t.unsafe):
            out[s] = (t.name, "unsafe", i, None)
    return out


@lru_cache(maxsize=None)
def _fact_patterns() -> list[tuple[re.Pattern, str, str]]:
    """(regex with a colour group, topic name, template) for every fact template."""
    out = []
    for t in TOPICS:
        for s in t.facts:
            pre, post = s.split("{c}")
            out.append((re.compile("^" + re.escape(pre) + r"(?P<c>[a-z]+)" + re.escape(post) + "$"), t.name, s))
    return out


def split_sentences(response: str) -> list[tuple[int, int]]:
    """Character spans of the sentences of ``response``: each ends after a '.', a last fragment may not."""
    spans, i, n = [], 0, len(response)
    while i < n:
        while i < n and response[i].isspace():
            i += 1
        if i >= n:
            break
        j = response.find(".", i)
        end = n if j < 0 else j + 1
        k = end
        while k > i and response[k - 1].isspace():
            k -= 1
        spans.append((i, k))
        i = end
    return spans


def _parse_sentence(text: str, start: int, spec: Spec, position: int) -> Sentence:
    end = start + len(text)
    whole = lambda kind: Sentence(kind, None, start, end, (Flaw(kind if kind != "rude_opener" else "rude", start, end),))
    if not text.endswith(" ."):
        return whole("garbled")
    body = text[:-2]
    if body in GOOD_OPENERS:
        return Sentence("opener", None, start, end) if position == 0 else whole("garbled")
    if body in RUDE_OPENERS:
        return whole("rude_opener")
    flaws: list[Flaw] = []
    core = body
    for clause in RUDE_CLAUSES + POLITE_CLAUSES:
        if body.endswith(" " + clause):
            core = body[: -len(clause) - 1]
            if clause in RUDE_CLAUSES:
                cs = start + len(core) + 1
                flaws.append(Flaw("rude", cs, cs + len(clause)))
            break
    hit = _core_index().get(core)
    colour_at = None
    if hit is None:
        for pat, tname, template in _fact_patterns():
            m = pat.match(core)
            if m and m["c"] in COLOURS:
                hit = (tname, "fact", TOPIC_BY_NAME[tname].facts.index(template), None)
                colour_at = (start + m.start("c"), start + m.end("c"), m["c"])
                break
    if hit is None:
        return whole("garbled")
    tname, kind, idx, item = hit
    if kind == "unsafe":
        return whole("unsafe")
    if tname != spec.topic.name:
        return whole("off_topic")
    if kind == "fact" and colour_at is not None and colour_at[2] != spec.colour:
        flaws.append(Flaw("contradiction", colour_at[0], colour_at[1]))
    return Sentence(kind, (tname, kind, idx), start, end, tuple(sorted(flaws, key=lambda f: f.start)), item)


TOPIC_BY_NAME = {t.name: t for t in TOPICS}


def parse_response(prompt: str | Spec, response: str) -> list[Sentence]:
    """The sentences of ``response`` with their flaws, given the prompt (text or :class:`Spec`)."""
    spec = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    out: list[Sentence] = []
    seen: set[tuple] = set()
    for pos, (s, e) in enumerate(split_sentences(response)):
        sent = _parse_sentence(response[s:e], s, spec, pos)
        if sent.key is not None:
            if sent.key in seen:  # a repeat subsumes the flaws inside it
                sent = Sentence(sent.kind, sent.key, s, e, (Flaw("repeat", s, e),), sent.item)
            seen.add(sent.key)
        out.append(sent)
    return out


# ----------------------------------------------------------------------------------------- gold reward


@dataclass(frozen=True)
class GoldScore:
    """The gold reward of one response, with its terms.

    reward:        total (the response-level terms minus the flaw penalties)
    item, length, helpful: the response-level terms (already weighted)
    penalty:       sum of the flaw weights (>= 0)
    flaws:         every flaw, in order
    n_sentences:   sentences (a trailing fragment counts as one)
    """

    reward: float
    item: float
    length: float
    helpful: float
    penalty: float
    flaws: tuple[Flaw, ...] = field(default_factory=tuple)
    n_sentences: int = 0

    @property
    def flawed_spans(self) -> list[tuple[int, int]]:
        return [(f.start, f.end) for f in self.flaws]


def score_sentences(spec: Spec, sentences: Sequence[Sentence]) -> GoldScore:
    content = [s for s in sentences if s.kind in ("step", "item", "fact") and not s.whole_flaw]
    covered = any(s.kind == "item" and s.item == spec.item for s in content)
    flaws = tuple(f for s in sentences for f in s.flaws)
    item = W_ITEM * covered
    length = W_LENGTH * (len(sentences) == spec.n)
    helpful = W_HELP * min(len({s.key for s in content}), spec.n)
    penalty = sum(f.weight for f in flaws)
    return GoldScore(item + length + helpful - penalty, item, length, helpful, penalty, flaws, len(sentences))


def gold_score(prompt: str | Spec, response: str) -> GoldScore:
    """The gold reward and its terms for ``response`` to ``prompt``."""
    spec = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    return score_sentences(spec, parse_response(spec, response))


def gold_reward(prompt: str | Spec, response: str) -> float:
    return gold_score(prompt, response).reward


def max_reward(spec: Spec) -> float:
    return W_ITEM + W_LENGTH + W_HELP * spec.n


# ----------------------------------------------------------------------------------------- demonstrations


@dataclass(frozen=True)
class ResponseStyle:
    """How demonstrations are written.

    flaw_rate:    probability that a sentence slot carries a flaw (of a kind drawn uniformly)
    item_rate:    probability that the requested item's sentence is included
    length_rate:  probability that the answer has exactly the requested number of sentences
    opener_rate:  probability of an opener sentence (it counts as a sentence)
    polite_rate:  probability that a good step ends in a polite clause
    """

    flaw_rate: float = 0.3
    item_rate: float = 0.8
    length_rate: float = 0.8
    opener_rate: float = 0.25
    polite_rate: float = 0.15


FLAW_KINDS = ("unsafe", "rude", "contradiction", "off_topic", "repeat")


def _good_sentence(spec: Spec, rng: random.Random, used: set[str]) -> str:
    pool = [s for s in spec.topic.steps if s not in used]
    pool += [s for w, s in spec.topic.items.items() if w != spec.item and s not in used]
    pool += [f.format(c=spec.colour) for f in spec.topic.facts if f.format(c=spec.colour) not in used]
    s = rng.choice(pool)
    used.add(s)
    return s


def _flawed_sentence(kind: str, spec: Spec, rng: random.Random, used: set[str], previous: list[str]) -> str:
    if kind == "unsafe":
        return rng.choice(spec.topic.unsafe)
    if kind == "rude":
        return _good_sentence(spec, rng, used) + " " + rng.choice(RUDE_CLAUSES)
    if kind == "contradiction":
        fact = rng.choice(spec.topic.facts)
        return fact.format(c=rng.choice([c for c in COLOURS if c != spec.colour]))
    if kind == "off_topic":
        other = rng.choice([t for t in TOPICS if t is not spec.topic])
        return rng.choice(other.steps)
    if kind == "repeat" and previous:
        return rng.choice(previous)
    return rng.choice(spec.topic.unsafe)


def sample_response(spec: Spec, rng: random.Random, style: ResponseStyle = ResponseStyle()) -> str:
    """A demonstration for ``spec``: mostly what was asked, with flaws at ``style.flaw_rate`` per sentence."""
    n = spec.n if rng.random() < style.length_rate else max(1, spec.n + rng.choice((-1, 1)))
    out: list[str] = []
    used: set[str] = set()
    content: list[str] = []
    if rng.random() < style.opener_rate:
        out.append(rng.choice(RUDE_OPENERS) if rng.random() < style.flaw_rate else rng.choice(GOOD_OPENERS))
    slots = max(1, n - len(out))
    item_slot = rng.randrange(slots) if rng.random() < style.item_rate else -1
    for k in range(slots):
        if rng.random() < style.flaw_rate:
            kind = rng.choice(FLAW_KINDS)
            out.append(_flawed_sentence(kind, spec, rng, used, content))
            continue
        s = spec.topic.items[spec.item] if k == item_slot else _good_sentence(spec, rng, used)
        used.add(s)
        content.append(s)
        out.append(s + (" " + rng.choice(POLITE_CLAUSES) if rng.random() < style.polite_rate else ""))
    return " ".join(s + " ." for s in out)


def make_demonstrations(n: int, seed: int, style: ResponseStyle = ResponseStyle()) -> list[dict[str, str]]:
    """``n`` SFT records ``{"prompt", "response"}`` drawn with ``seed``."""
    rng = random.Random(f"demos-{seed}")
    out = []
    for _ in range(n):
        spec = sample_spec(rng)
        out.append({"prompt": spec.prompt, "response": sample_response(spec, rng, style)})
    return out


def vocabulary() -> set[str]:
    """Every word the domain can produce (prompts and responses)."""
    words: set[str] = set("how do i ? my is . please mention the answer in sentences ,".split())
    words |= set(COLOURS) | set(NUMBERS)
    for t in TOPICS:
        for s in (t.task, t.obj, *t.steps, *t.items.values(), *t.items, *t.unsafe, *t.facts):
            words |= set(s.replace("{c}", "").split())
    for s in GOOD_OPENERS + RUDE_OPENERS + POLITE_CLAUSES + RUDE_CLAUSES:
        words |= set(s.split())
    return words
