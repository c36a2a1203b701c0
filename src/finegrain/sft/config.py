"""Options of `finegrain sft` (light module: no torch import)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import TrainingOptions, opt
from ..errors import ConfigError


SCRATCH_SIZES = ("vocab_size", "n_layer", "n_head", "n_embd", "n_positions")  # options of --from-scratch only


DEFAULT_MAX_LENGTH = 512
"""sft's ``--max-length`` when none is given (cut to the model's positions without a warning)."""


@dataclass(kw_only=True)
class SFTConfig(TrainingOptions):
    """Supervised fine-tuning of a causal LM on prompt/response data (loss on response tokens only)."""

    data: str = opt(help="training records with `prompt` and `response` (or `chosen`) fields: "
                         ".jsonl/.json/.jsonl.gz/.parquet or a `datasets` name")
    output: str = opt(help="output directory: the policy checkpoint, metrics.jsonl, checkpoints/")
    model: str | None = opt(None, "causal LM to fine-tune: hub name or local path (not with --from-scratch)")
    from_scratch: bool = opt(False, "train a byte-level BPE tokenizer on the data and a tiny GPT-2 from its "
                                    "config instead of loading --model")
    vocab_size: int = opt(1024, "with --from-scratch: tokenizer vocabulary size (256 bytes + merges + specials)")
    n_layer: int = opt(2, "with --from-scratch: transformer layers")
    n_head: int = opt(2, "with --from-scratch: attention heads")
    n_embd: int = opt(64, "with --from-scratch: hidden size")
    n_positions: int = opt(256, "with --from-scratch: maximum positions")
    batch_size: int = opt(8, "records per micro-batch per process")
    lr: float = opt(2e-5, "peak learning rate")
    max_length: int | None = opt(None, "maximum tokens per record; the prompt is cut from the left first (default: "
                                       f"{DEFAULT_MAX_LENGTH}, or the model's positions when fewer)", ge=2)
    eval_fraction: float = opt(0.0, "fraction of records held out (by content hash) to report eval_loss")
    save_every: int = opt(0, "write a resumable checkpoint every N optimizer steps (0 = never)")

    def validate(self) -> None:
        if self.from_scratch == (self.model is not None):
            raise ConfigError("give exactly one of --model NAME_OR_PATH and --from-scratch")
        super().validate()
        for name in SCRATCH_SIZES:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        changed = [name for name in SCRATCH_SIZES if getattr(self, name) != defaults[name]]
        if not self.from_scratch and changed:  # a loaded model keeps its own sizes: the option would do nothing
            raise ConfigError(f"--{changed[0].replace('_', '-')} applies with --from-scratch; --model "
                              f"{self.model} keeps its own vocabulary and sizes")
        if self.from_scratch and self.n_embd % self.n_head:
            raise ConfigError("--n-embd must be a multiple of --n-head")
        if self.from_scratch and self.vocab_size < 260:
            raise ConfigError("--vocab-size must be >= 260 (256 byte symbols + special tokens)")
