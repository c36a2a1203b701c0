"""From pairs on disk to tokenised, aligned, batched reward-model training pairs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..data.schema import Comparison, comparisons
from ..errors import InputError
from ..training import held_out
from .align import align_tokens
from .inputs import RMExample, build_rm_example
from .model import RMBatch, collate, position_mask


def load_comparisons_report(path: str, pairs: str, *, skip_invalid: bool = False,
                            rejects_path: str | None = None):
    """(comparisons, LoadReport) of a pairs file; ``pairs`` = preference or edit.

    The report counts rejected records and edits equal to their original (dropped by the loader).
    """
    from ..data.loaders import load_pairs_report

    report = load_pairs_report(path, kind=pairs, skip_invalid=skip_invalid, rejects_path=rejects_path)
    if not report.pairs:
        raise InputError(f"no usable pairs ({report.n_unchanged} edits identical to the rejected response, "
                         f"{report.n_rejected} invalid records)", path=path)
    try:
        return comparisons(report.pairs, pairs), report  # type: ignore[arg-type]
    except (TypeError, ValueError) as e:
        raise InputError(str(e), path=path) from e


def load_comparisons(path: str, pairs: str, *, skip_invalid: bool = False,
                     rejects_path: str | None = None) -> list[Comparison]:
    """(prompt, better, worse) triples of a pairs file; ``pairs`` = preference or edit."""
    return load_comparisons_report(path, pairs, skip_invalid=skip_invalid, rejects_path=rejects_path)[0]


def split_by_id(items: Sequence[Comparison], fraction: float, seed: int) -> tuple[list[Comparison], list[Comparison]]:
    """(train, eval) split by id hash; ``fraction`` of the ids go to eval."""
    train, ev = [], []
    for c in items:
        (ev if held_out(str(c.id), fraction, seed) else train).append(c)
    return train, ev


@dataclass
class PairFeatures:
    """One tokenised comparison with the U1 marks of both responses (over response positions)."""

    id: str
    better: RMExample
    worse: RMExample
    u1_better: list[bool]
    u1_worse: list[bool]
    u0_pairs: list[tuple[int, int]]  # (better position, worse position) of aligned unchanged tokens


def u0_pairs(opcodes) -> list[tuple[int, int]]:
    """(edited position, original position) of every token of the diff's equal blocks."""
    return [(j1 + k, i1 + k) for tag, i1, i2, j1, _ in opcodes if tag == "equal" for k in range(i2 - i1)]


def pair_alignment(better: RMExample, worse: RMExample, better_text: str, worse_text: str,
                   tokenizer=None) -> tuple[list[bool], list[bool], list[tuple[int, int]]]:
    """U1 marks (better, worse) and U0 pairs of one comparison's two examples, as training and evaluation see them.

    When either example was cut (and ``tokenizer`` can re-encode the whole responses), from the alignment of
    the whole responses (:func:`window_alignment`); otherwise from the two examples' own response tokens.
    """
    if tokenizer is not None and (better.truncated or worse.truncated):
        from ..tokens import encode_response

        return window_alignment(better, worse, encode_response(tokenizer, better_text),
                                encode_response(tokenizer, worse_text))
    al = align_tokens(worse.response_ids, better.response_ids)
    return al.changed_edited, al.changed_original, u0_pairs(al.opcodes)


def window_alignment(better: RMExample, worse: RMExample, better_ids: Sequence[int],
                     worse_ids: Sequence[int]) -> tuple[list[bool], list[bool], list[tuple[int, int]]]:
    """U1 marks and U0 pairs of two (maybe truncated) examples, from the alignment of their WHOLE responses.

    ``*_ids`` are the full response token ids (before any cut). Aligning the whole responses and then
    keeping the marks of the positions each example kept means a cut never makes an unchanged token
    look changed (aligning the cut responses would: the edit shifts where each side is cut). The
    closing token keeps its mark only where nothing was cut after it.
    """
    closing_b, closing_w = better.response_ids[-1:], worse.response_ids[-1:]
    al = align_tokens(list(worse_ids) + closing_w, list(better_ids) + closing_b)

    def window(marks: list[bool], ex: RMExample, n_full: int) -> list[bool]:
        kept = len(ex.response_ids) - 1                  # response tokens kept, before the closing token
        return marks[:kept] + [marks[-1] if kept == n_full else False]

    mb, mw = window(al.changed_edited, better, len(better_ids)), window(al.changed_original, worse, len(worse_ids))
    nb, nw = len(better.response_ids) - 1, len(worse.response_ids) - 1
    pairs = [(j, i) for j, i in u0_pairs(al.opcodes) if j < nb and i < nw]
    return mb, mw, pairs


def featurize(tokenizer, items: Sequence[Comparison], *, max_length: int, template: str | None = None,
              with_offsets: bool = False, view: str = "causal") -> tuple[list[PairFeatures], int, int]:
    """Tokenise and align every comparison; drop those whose two responses are identical.

    The alignment is made on the whole responses, then cut to what ``max_length`` keeps
    (:func:`window_alignment`). Returns (features, number dropped as identical, how many of those
    differ only beyond ``max_length`` - the edit was cut off by truncation, which the summary
    reports apart).
    """
    out, dropped, cut = [], 0, 0
    for c in items:
        b = build_rm_example(tokenizer, c.prompt, c.better, max_length=max_length, template=template,
                             with_offsets=with_offsets, view=view)
        w = build_rm_example(tokenizer, c.prompt, c.worse, max_length=max_length, template=template,
                             with_offsets=with_offsets, view=view)
        mb, mw, pairs = pair_alignment(b, w, c.better, c.worse, tokenizer)
        if not any(mb) and not any(mw):
            dropped += 1
            cut += int(b.truncated or w.truncated)
            continue
        out.append(PairFeatures(str(c.id), b, w, mb, mw, pairs))
    return out, dropped, cut


@dataclass
class PairBatch:
    """B pairs as 2B rows: rows [0, B) are the better responses, rows [B, 2B) the worse ones.

    inputs:   RMBatch of the 2B rows (input_ids, attention_mask, response_mask, last_index)
    u1_mask:  (2B, L) 1 on the changed (U1) response positions of each row
    u0_better, u0_worse: (B, K) absolute positions of the k-th aligned U0 token pair (0 = padding)
    u0_mask:  (B, K) 1 where that pair exists
    """

    inputs: RMBatch
    u1_mask: torch.Tensor
    u0_better: torch.Tensor
    u0_worse: torch.Tensor
    u0_mask: torch.Tensor

    @property
    def n_pairs(self) -> int:
        return self.u1_mask.shape[0] // 2

    def to(self, device) -> "PairBatch":
        return PairBatch(self.inputs.to(device), *(t.to(device) for t in (self.u1_mask, self.u0_better,
                                                                          self.u0_worse, self.u0_mask)))


def collate_pairs(features: Sequence[PairFeatures], pad_id: int) -> PairBatch:
    examples = [f.better for f in features] + [f.worse for f in features]
    marks = [f.u1_better for f in features] + [f.u1_worse for f in features]
    inputs = collate(examples, pad_id)
    k = max((len(f.u0_pairs) for f in features), default=0)
    u0_b, u0_w, u0_m = (torch.zeros((len(features), k), dtype=torch.long) for _ in range(3))
    for i, f in enumerate(features):
        if f.u0_pairs:
            pb, pw = zip(*f.u0_pairs)
            n = len(pb)
            u0_b[i, :n] = torch.as_tensor(pb) + f.better.response_start
            u0_w[i, :n] = torch.as_tensor(pw) + f.worse.response_start
            u0_m[i, :n] = 1
    return PairBatch(inputs, position_mask(examples, inputs.input_ids.shape[1], marks), u0_b, u0_w, u0_m)
