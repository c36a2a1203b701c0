"""Token alignment (DESIGN.md decision 1) and span -> token mapping: properties and examples."""
from __future__ import annotations

import random

from hypothesis import given, settings, strategies as st

from finegrain.rm.align import align_tokens, later_copies, spans_to_token_mask
from finegrain.rm.inputs import build_rm_example

EOS = 0
ids = st.lists(st.integers(1, 6), min_size=0, max_size=30)
distinct = st.lists(st.integers(1, 200), min_size=1, max_size=30, unique=True)


def marked(mask):
    return [k for k, m in enumerate(mask) if m]


@given(ids)
def test_identical_has_no_changed_tokens(a):
    al = align_tokens(a + [EOS], a + [EOS])
    assert not any(al.changed_original) and not any(al.changed_edited)
    assert al.identical


@given(ids, ids)
def test_different_responses_have_a_changed_token_on_each_side(a, b):
    al = align_tokens(a + [EOS], b + [EOS])
    assert len(al.changed_original) == len(a) + 1 and len(al.changed_edited) == len(b) + 1
    if a != b:
        assert any(al.changed_original) and any(al.changed_edited)
        assert not al.identical
    else:
        assert not any(al.changed_original) and not any(al.changed_edited)


@given(ids, ids)
def test_equal_blocks_are_never_marked_and_opcodes_cover_both_sides(a, b):
    al = align_tokens(a, b)
    covered_a = sorted(k for tag, i1, i2, _, _ in al.opcodes for k in range(i1, i2))
    covered_b = sorted(k for tag, _, _, j1, j2 in al.opcodes for k in range(j1, j2))
    assert covered_a == list(range(len(a))) and covered_b == list(range(len(b)))
    for tag, i1, i2, j1, j2 in al.opcodes:
        if tag == "equal":
            assert a[i1:i2] == b[j1:j2]
        elif tag == "replace":  # both sides non-empty: exactly the block's tokens
            assert all(al.changed_original[i1:i2]) and all(al.changed_edited[j1:j2])


@given(distinct, st.data())
def test_pure_substitutions_mark_exactly_the_substituted_tokens(a, data):
    # one-token substitutions, no two adjacent: every unchanged run is as long as its neighbours, none absorbed
    positions = sorted(data.draw(st.sets(st.integers(0, len(a) - 1), min_size=1)))
    positions = [p for k, p in enumerate(positions) if k == 0 or p - positions[k - 1] > 1]
    b = list(a)
    for n, p in enumerate(positions):
        b[p] = 1000 + n  # ids that occur nowhere else
    al = align_tokens(a + [EOS], b + [EOS])
    assert marked(al.changed_original) == positions
    assert marked(al.changed_edited) == positions


@given(distinct, st.data())
def test_insertion_marks_the_inserted_tokens_and_the_following_original_token(a, data):
    p = data.draw(st.integers(0, len(a)))
    k = data.draw(st.integers(1, 5))
    inserted = [1000 + n for n in range(k)]
    b = a[:p] + inserted + a[p:]
    al = align_tokens(a + [EOS], b + [EOS])
    assert marked(al.changed_edited) == list(range(p, p + k))
    assert marked(al.changed_original) == [p]  # p == len(a) is the closing EOS


@given(distinct, st.data())
def test_deletion_marks_the_deleted_tokens_and_the_following_edited_token(a, data):
    p = data.draw(st.integers(0, len(a) - 1))
    q = data.draw(st.integers(p + 1, len(a)))
    b = a[:p] + a[q:]
    al = align_tokens(a + [EOS], b + [EOS])
    assert marked(al.changed_original) == list(range(p, q))
    assert marked(al.changed_edited) == [p]


def test_divergence_point_examples():
    # insertion at the very end lands on the closing EOS; without a closing token, on the last token
    assert align_tokens([5, 6, EOS], [5, 6, 7, EOS]).changed_original == [False, False, True]
    assert align_tokens([5, 6], [5, 6, 7]).changed_original == [False, True]
    assert align_tokens([5, 6, 7, EOS], [5, 7, EOS]).changed_edited == [False, True, False]
    assert align_tokens([], []).changed_original == []
    assert align_tokens([], [3]).changed_edited == [True]


@st.composite
def tokenised_text(draw):
    """A text, offsets of a segmentation with gaps (trimmed spaces), a closing zero-width token."""
    n = draw(st.integers(1, 40))
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), max_size=10))) if n > 1 else []
    bounds = [0] + cuts + [n]
    offsets = []
    for s, e in zip(bounds, bounds[1:]):
        s2 = s + draw(st.integers(0, max(0, e - s - 1)))  # leading gap, token stays non-empty
        offsets.append((s2, e))
    offsets.append((n, n))
    spans = draw(st.lists(st.tuples(st.integers(0, n), st.integers(0, n)).map(sorted).map(tuple), max_size=4))
    return n, offsets, spans


@given(tokenised_text())
def test_span_mask_equals_character_overlap(case):
    n, offsets, spans = case
    mask = spans_to_token_mask(offsets, spans)
    in_span = [any(a <= c < b for a, b in spans) for c in range(n)]
    expected = [any(in_span[c] for c in range(s, e)) for s, e in offsets]
    assert mask == expected
    assert mask[-1] is False  # zero-width closing token never matches
    assert not any(spans_to_token_mask(offsets, []))
    assert all(spans_to_token_mask(offsets, [(0, n)])[:-1])


def test_span_mask_examples():
    offs = [(0, 3), (4, 7), (7, 8), (8, 8)]
    assert spans_to_token_mask(offs, [(3, 4)]) == [False] * 4   # only the gap
    assert spans_to_token_mask(offs, [(6, 7)]) == [False, True, False, False]
    assert spans_to_token_mask(offs, [[2, 5]]) == [True, True, False, False]
    assert spans_to_token_mask(offs, None) == [False] * 4
    assert spans_to_token_mask(offs, [(5, 5)]) == [False] * 4   # empty span


def test_real_tokenizer_word_substitution_marks_the_word(tiny_tokenizer):
    prompt = "Please answer politely."
    worse = "You are stupid for asking that."
    better = "You are kind for asking that."
    w = build_rm_example(tiny_tokenizer, prompt, worse, max_length=64, with_offsets=True)
    b = build_rm_example(tiny_tokenizer, prompt, better, max_length=64, with_offsets=True)
    assert w.input_ids[:w.response_start] == b.input_ids[:b.response_start]  # same prompt boundary
    al = align_tokens(w.response_ids, b.response_ids)

    def visible(mask, offsets):  # a lone "Ġ" token has zero width after offset trimming
        return [m for m, (s, e) in zip(mask, offsets) if e > s]

    for ex, text, word, changed in ((w, worse, "stupid", al.changed_original), (b, better, "kind", al.changed_edited)):
        start = text.index(word)
        gold = spans_to_token_mask(ex.response_offsets, [(start, start + len(word))])
        assert visible(changed, ex.response_offsets) == visible(gold, ex.response_offsets)
        assert sum(gold) >= 1 and not changed[-1]


@settings(deadline=None, max_examples=1)
@given(st.just(0))
def test_long_pair_aligns(_):
    """A 2,000-token pair with scattered edits (time it with benchmarks, not here)."""
    rng = random.Random(0)
    a = [rng.randrange(1, 500) for _ in range(2000)] + [EOS]
    b = list(a)
    for p in rng.sample(range(2000), 40):
        b[p] = 600 + p
    al = align_tokens(a, b)
    assert sum(al.changed_edited) >= 40 and sum(al.changed_original) >= 40
    assert not al.changed_original[-1]


@given(st.lists(st.integers(1, 4), min_size=4, max_size=4), st.integers(0, 3))
def test_a_shared_token_inside_a_rewrite_is_absorbed_iff_both_sides_changed_more(sizes, n_kept):
    # original = kept + A + [77] + B + kept2, edited = kept + C + [77] + D + kept2 (A-D distinct ids)
    la, lb, lc, ld = sizes
    fresh = iter(range(100, 200))
    part = lambda n: [next(fresh) for _ in range(n)]  # noqa: E731
    kept, kept2 = list(range(1, 1 + n_kept)), [50, 51]
    a, b, c, d = part(la), part(lb), part(lc), part(ld)
    al = align_tokens(kept + a + [77] + b + kept2 + [EOS], kept + c + [77] + d + kept2 + [EOS])
    absorbed = min(max(la, lc), max(lb, ld)) > 1
    shared_at = n_kept + la
    assert al.changed_original[shared_at] == absorbed
    changed = list(range(n_kept, n_kept + la)) + ([shared_at] if absorbed else []) + \
        list(range(shared_at + 1, shared_at + 1 + lb))
    assert marked(al.changed_original) == changed


def test_coincidence_example_and_two_close_fixes():
    # "walk away with the pot ." -> "wipe the glass with a sponge ." : the shared "the" is part of the rewrite
    original, edited = [10, 11, 12, 13, 14, 9, EOS], [20, 13, 21, 12, 22, 23, 9, EOS]
    al = align_tokens(original, edited)
    assert marked(al.changed_original) == [0, 1, 2, 3, 4] and marked(al.changed_edited) == [0, 1, 2, 3, 4, 5]
    # two one-token fixes one token apart: the token between them stays unchanged
    al = align_tokens([1, 2, 3, 4, EOS], [1, 7, 3, 8, EOS])
    assert marked(al.changed_original) == [1, 3]


@given(distinct, st.data())
def test_a_deleted_copy_of_a_repeated_block_is_the_later_one(a, data):
    """difflib deletes the first of two adjacent copies; the later one is the repeat (a causal RM sees it as one)."""
    p = data.draw(st.integers(0, len(a) - 1))
    q = data.draw(st.integers(p + 1, len(a)))
    copies = data.draw(st.integers(2, 3))
    block = a[p:q]
    original = a[:p] + block * copies + a[q:]
    al = align_tokens(original + [EOS], a + [EOS])
    assert marked(al.changed_original) == list(range(p + len(block), p + copies * len(block)))  # all but the first
    assert marked(al.changed_edited) == [q]  # the edited token after the deletion (q == len(a): EOS)
    inserted = align_tokens(a + [EOS], original + [EOS])  # and an inserted copy is the later one too
    assert marked(inserted.changed_edited) == list(range(p + len(block), p + copies * len(block)))


def test_a_deletion_is_moved_only_onto_an_identical_copy():
    the, cat, dot, dog = 1, 2, 3, 4
    al = align_tokens([the, cat, dot, the, dog, dot, EOS], [the, dog, dot, EOS])  # "the cat . the dog ."
    assert marked(al.changed_original) == [0, 1, 2]  # the first sentence, not "cat . the"
    al = align_tokens([the, cat, the, cat, EOS], [the, cat, EOS])
    assert marked(al.changed_original) == [2, 3] and marked(al.changed_edited) == [2]


@given(ids, ids)
def test_moving_onto_later_copies_keeps_a_valid_alignment_of_the_same_size(a, b):
    import difflib

    raw = difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes()
    moved = later_copies(raw, a, b)
    assert [op for op in moved if op[2] > op[1] or op[4] > op[3]] == moved  # no empty blocks
    assert [(op[1], op[3]) for op in moved][:1] == [(0, 0)][:len(moved)]
    for prev, op in zip(moved, moved[1:]):
        assert (prev[2], prev[4]) == (op[1], op[3])  # contiguous on both sides
    for tag, i1, i2, j1, j2 in moved:
        if tag == "equal":
            assert a[i1:i2] == b[j1:j2]
    size = lambda ops, tag: sum(max(op[2] - op[1], op[4] - op[3]) for op in ops if op[0] == tag)  # noqa: E731
    assert all(size(moved, t) == size(raw, t) for t in ("delete", "insert", "replace", "equal"))
    assert later_copies(moved, a, b) == moved  # already on the later copies
