"""Agreement measures, the export's consensus rule, screening scores and the checks of posted answers."""
from __future__ import annotations

import doctest

import pytest

from finegrain.annotate import agreement
from finegrain.annotate.agreement import (
    changed_words,
    consensus_index,
    pair_agreement,
    screening_score,
    span_agreement,
    word_agreement,
    words_in_spans,
)
from finegrain.annotate.answers import AnswerError, build_answer, line_ends_like, parse_spans

ORIGINAL = "Soak it in bleach overnight, then scrub it with steel wool."


def test_doctests():
    assert doctest.testmod(agreement).failed == 0


def test_changed_words_follow_the_reward_models_convention():
    # words: Soak it in bleach overnight , then scrub it with steel wool .
    assert changed_words(ORIGINAL, ORIGINAL) == frozenset()
    assert changed_words(ORIGINAL, ORIGINAL.replace("bleach", "hot water")) == {3}
    assert changed_words(ORIGINAL, ORIGINAL.replace(" overnight", "")) == {4}
    assert changed_words(ORIGINAL, ORIGINAL.replace("then", "and then")) == {6}  # insertion marks the next word
    assert changed_words(ORIGINAL, ORIGINAL + " Dry it.") == {13}  # an insertion at the end marks the end
    assert changed_words(ORIGINAL, None) == frozenset()


def test_word_and_span_agreement():
    a = changed_words(ORIGINAL, ORIGINAL.replace("bleach overnight", "hot water"))
    b = changed_words(ORIGINAL, ORIGINAL.replace("bleach", "soapy water"))
    assert a == {3, 4} and b == {3}
    assert word_agreement(a, b) == 0.5 and word_agreement(frozenset(), frozenset()) == 1.0
    assert span_agreement([(11, 17)], [(11, 17)]) == 1.0
    assert span_agreement([(0, 10)], [(5, 15)]) == round(5 / 15, 6)
    assert span_agreement([(0, 4), (10, 12)], [(2, 11)]) == round(3 / 12, 6)
    assert span_agreement([], [(0, 3)]) is None
    assert words_in_spans(ORIGINAL, [(11, 17)]) == {3}


def test_pair_agreement_and_consensus():
    edits = [ORIGINAL.replace("bleach", "hot water"), ORIGINAL.replace("bleach", "soapy water"),
             ORIGINAL.replace("steel wool", "a brush")]
    answers = [{"action": "submit", "edited": e, "spans": []} for e in edits]
    answers[0]["spans"] = [[11, 17, "unsafe"]]
    answers[1]["spans"] = [[8, 17, "unsafe"]]
    ag = pair_agreement(ORIGINAL, answers)
    assert ag["pairwise_word"] == [1.0, 0.0, 0.0] and ag["word_agreement"] == round(1 / 3, 6)
    assert ag["span_agreement"] == round(6 / 9, 6) and ag["n_span_comparisons"] == 1 and ag["same_action"]
    assert consensus_index(ORIGINAL, edits) == 0  # the two that agree beat the odd one; first of them wins
    assert consensus_index(ORIGINAL, edits[::-1]) == 1
    assert consensus_index(ORIGINAL, edits[1:]) == 0  # two edits always tie: the first submitted
    mixed = pair_agreement(ORIGINAL, [answers[0], {"action": "nothing", "edited": None, "spans": []}])
    assert mixed["word_agreement"] == 0.0 and not mixed["same_action"]


def test_screening_scores():
    nothing = {"nothing_to_fix": True}
    assert screening_score(nothing, ORIGINAL, "nothing", None, [], None, 0.75) == {"passed": True, "score": 1.0}
    assert not screening_score(nothing, ORIGINAL, "submit", ORIGINAL + " x", [], 0.1, 0.75)["passed"]
    flaw = {"nothing_to_fix": False, "edited": ORIGINAL.replace("bleach", "hot water"), "gold_spans": []}
    ok = screening_score(flaw, ORIGINAL, "submit", ORIGINAL.replace("bleach", "warm water"), [], 0.1, 0.75)
    assert ok == {"passed": True, "score": 1.0}
    by_span = screening_score({"nothing_to_fix": False, "edited": None, "gold_spans": [[11, 17]]}, ORIGINAL,
                              "submit", ORIGINAL.replace("wool", "brush"), [[11, 17, "unsafe"]], 0.1, 0.75)
    assert by_span["passed"]
    missed = screening_score(flaw, ORIGINAL, "submit", ORIGINAL.replace("wool", "brush"), [], 0.1, 0.75)
    assert missed == {"passed": False, "score": 0.0}
    assert not screening_score(flaw, ORIGINAL, "nothing", None, [], None, 0.75)["passed"]
    too_big = screening_score(flaw, ORIGINAL, "submit", "Hot water.", [], 0.9, 0.75)
    assert too_big["score"] == 1.0 and not too_big["passed"]


def answer(payload, original=ORIGINAL, prefill=None):
    return build_answer(payload, original=original, prefill=prefill, error_types=["unsafe", "other"],
                        guidelines_version="minimal_edit_v1", wall_s=30.0)


def test_posted_answers_are_checked():
    a = answer({"action": "submit", "text": ORIGINAL.replace("bleach", "hot water"), "spans": [[11, 17, "unsafe"]],
                "active_s": 99.0, "note": "  "})
    assert a.edit_ratio == a.stats["edit_ratio"] > 0 and a.spans == [[11, 17, "unsafe"]]
    assert a.active_s == 30.0 and a.note is None  # time clamped to the wall time
    with pytest.raises(AnswerError, match="changes nothing: choose 'Nothing to fix'"):
        answer({"action": "submit", "text": "  " + ORIGINAL.replace(" ", "  ")})
    with pytest.raises(AnswerError, match="outside the original"):
        answer({"action": "submit", "text": "x", "spans": [[0, 999, "unsafe"]]})
    with pytest.raises(AnswerError, match="unknown error type"):
        answer({"action": "submit", "text": "x", "spans": [[0, 2, "bad type"]]})
    with pytest.raises(AnswerError, match="unknown action"):
        answer({"action": "delete"})
    with pytest.raises(AnswerError, match="flag reason"):
        answer({"action": "flag", "flag_reason": "boring"})
    with pytest.raises(AnswerError, match="control character"):
        answer({"action": "submit", "text": "bad\x00text"})
    nothing = answer({"action": "nothing", "text": "ignored", "spans": [[0, 2, "unsafe"]]})
    assert nothing.edited is None and nothing.spans == [] and nothing.edit_ratio is None
    assert answer({"action": "flag"}).flag_reason == "unsafe"


def test_prefill_use_is_measured():
    llm = ORIGINAL.replace("bleach", "hot water")
    kept = answer({"action": "submit", "text": llm}, prefill=llm)
    assert kept.stats["prefill_edit_ratio"] == 0.0 and kept.stats["prefill_changed"] is False
    fixed = answer({"action": "submit", "text": llm.replace("steel wool", "a brush")}, prefill=llm)
    assert fixed.stats["prefill_edit_ratio"] > 0 and fixed.stats["prefill_changed"] is True


def test_line_ends_follow_the_original():
    assert line_ends_like("a\r\nb", "a\nb x") == "a\r\nb x"
    assert line_ends_like("a\nb", "a\nb x") == "a\nb x"
    assert parse_spans([[0, 2, "unsafe"], [0, 1, "other"]], "abc", ["unsafe", "other"]) == [[0, 1, "other"],
                                                                                           [0, 2, "unsafe"]]


def test_a_pre_edit_with_other_line_ends_is_unchanged_when_the_person_changed_nothing():
    """A CRLF response, an LLM's pre-edit of it with LF lines: the text box shows it with LF, the person submits it
    as is, the server gives it the original's CRLF back. The person did not change the pre-edit."""
    original = "Soak it in bleach.\r\nThen dry it."
    llm = "Rinse it with water.\nThen dry it."
    kept = answer({"action": "submit", "text": llm}, original=original, prefill=llm)
    assert kept.edited == "Rinse it with water.\r\nThen dry it."
    assert kept.stats["prefill_changed"] is False and kept.stats["prefill_edit_ratio"] == 0.0
    fixed = answer({"action": "submit", "text": llm.replace("water", "hot water")}, original=original, prefill=llm)
    assert fixed.stats["prefill_changed"] is True
