"""Pair formats, loading with validation, and converters from public datasets."""
from .convert import QA_PROMPTS, SOURCES, convert
from ..spans import merge_spans
from .loaders import KINDS, LoadReport, load_pairs, load_pairs_report, pair_from_record, save_pairs
from .schema import Comparison, EditedPair, PairKind, PreferencePair, comparisons

__all__ = ["KINDS", "QA_PROMPTS", "SOURCES", "Comparison", "EditedPair", "LoadReport", "PairKind", "PreferencePair",
           "comparisons", "convert", "load_pairs", "load_pairs_report", "merge_spans", "pair_from_record",
           "save_pairs"]
