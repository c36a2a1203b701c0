"""Options of `finegrain sft` (light module: no torch import)."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import opt
from ..errors import ConfigError


@dataclass
class SFTConfig:
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
    epochs: float = opt(1.0, "passes over the training records (fractions allowed)")
    batch_size: int = opt(8, "records per micro-batch per process")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    lr: float = opt(2e-5, "peak learning rate")
    weight_decay: float = opt(0.0, "decoupled weight decay (AdamW) or L2 (SGD)")
    optimizer: str = opt("adamw", "optimizer", choices=["adamw", "sgd"])
    lr_scheduler: str = opt("linear", "learning-rate schedule after warm-up", choices=["constant", "linear", "cosine"])
    warmup_ratio: float = opt(0.03, "fraction of the optimizer steps spent warming up linearly from 0")
    max_length: int = opt(512, "maximum tokens per record; the prompt is cut from the left first")
    max_grad_norm: float = opt(1.0, "clip the gradient norm to this (0 = no clipping)")
    eval_fraction: float = opt(0.0, "fraction of records held out (by content hash) to report eval_loss")
    save_every: int = opt(0, "write a resumable checkpoint every N optimizer steps (0 = never)")
    keep_checkpoints: int = opt(2, "how many of the newest step checkpoints to keep")
    resume: bool = opt(False, "continue from the newest checkpoint in OUTPUT/checkpoints")
    seed: int = opt(0, "seed for data order and (with --from-scratch) initialisation")
    skip_invalid: bool = opt(False, "skip invalid records (counted in the summary) instead of stopping")
    trust_remote_code: bool = opt(False, "allow model code from the hub (off: only transformers' own code runs)")
    log_with: str = opt("auto", "trackers: auto (TensorBoard when installed, W&B when configured), none, "
                                "tensorboard, wandb, or a comma-separated list")
    dtype: str = opt("float32", "weights dtype", choices=["float32", "bfloat16", "float16"])
    template: str | None = opt(None, "prompt template with {prompt} for tokenizers without a chat template "
                                     "(default: '{prompt}\\n')")

    def validate(self) -> None:
        if self.from_scratch == (self.model is not None):
            raise ConfigError("give exactly one of --model NAME_OR_PATH and --from-scratch")
        for name in ("batch_size", "grad_accum", "max_length", "vocab_size", "n_layer", "n_head", "n_embd",
                     "n_positions"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.from_scratch and self.n_embd % self.n_head:
            raise ConfigError("--n-embd must be a multiple of --n-head")
        if self.from_scratch and self.vocab_size < 260:
            raise ConfigError("--vocab-size must be >= 260 (256 byte symbols + special tokens)")
        if self.epochs <= 0:
            raise ConfigError("--epochs must be > 0")
        if self.lr <= 0:
            raise ConfigError("--lr must be > 0")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError("--eval-fraction must be in [0, 1)")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError("--warmup-ratio must be in [0, 1)")
