"""Options of `finegrain train-rm` and `finegrain eval-rm` (light module: no torch import)."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import TrainingOptions, opt
from ..errors import ConfigError


@dataclass(kw_only=True)
class TrainRMConfig(TrainingOptions):
    """Train a sequence or token-level reward model on preference or edited pairs."""

    data: str = opt(help="training pairs: .jsonl/.json/.jsonl.gz/.parquet or a `datasets` name")
    model: str = opt(help="backbone to start from: hub name, local path (a causal LM such as an SFT policy "
                          "works: its backbone is loaded and a new one-label head added)")
    output: str = opt(help="output directory: the reward model checkpoint, metrics.jsonl, checkpoints/")
    loss: str = opt("token_edit", "sequence: Bradley-Terry on the last-token score (sequence RM); token_mean: "
                    "Eq. 1-3, BT on the mean token reward (token RM); token_edit: Eq. 4, changed (U1) tokens "
                    "only, each side divided by its own length (token RM)",
                    choices=["sequence", "token_mean", "token_edit"])
    pairs: str = opt("edit", "preference: chosen > rejected; edit: edited > rejected",
                     choices=["preference", "edit"])
    eval_data: str | None = opt(None, "held-out pairs (same format); default: split --eval-fraction off --data")
    eval_fraction: float = opt(0.05, "fraction of --data held out for evaluation when --eval-data is not given "
                                     "(by pair id, deterministic given --seed; 0 = no evaluation)")
    batch_size: int = opt(8, "pairs per micro-batch per process")
    eval_every: int = opt(50, "evaluate every N optimizer steps (0 = only at the end)")
    eval_batch_size: int = opt(16, "pairs per batch when evaluating")
    u0_weight: float = opt(0.0, "token losses: weight of a regulariser pulling the rewards of aligned unchanged (U0) "
                                "tokens of the two responses together, the assumption behind Eq. 3-4 "
                                "(0 = the paper's loss)")

    def validate(self) -> None:
        super().validate()
        if self.eval_batch_size < 1:
            raise ConfigError("--eval-batch-size must be >= 1")
        if self.u0_weight < 0:
            raise ConfigError("--u0-weight must be >= 0")
        if self.u0_weight and self.loss == "sequence":
            raise ConfigError("--u0-weight applies to token losses (token_mean, token_edit), not --loss sequence")

    @property
    def kind(self) -> str:
        """The reward-model kind the loss needs."""
        return "sequence" if self.loss == "sequence" else "token"


@dataclass
class EvalRMConfig:
    """Pairwise accuracy (and token AUROC) of a reward model."""

    model: str = opt(help="reward model directory written by `finegrain train-rm`")
    data: str = opt(help="pairs to evaluate: .jsonl/.json/.jsonl.gz/.parquet or a `datasets` name")
    output: str = opt(help="JSON file for the results (written atomically)")
    pairs: str = opt("edit", "preference: chosen > rejected; edit: edited > rejected", choices=["preference", "edit"])
    batch_size: int = opt(16, "responses per forward pass")
    max_length: int | None = opt(None, "maximum tokens per input (default: the value the model was trained with)")
    skip_invalid: bool = opt(False, "skip invalid records instead of stopping")
    trust_remote_code: bool = opt(False, "allow model code from the hub")
    dtype: str = opt("float32", "weights dtype", choices=["float32", "bfloat16", "float16"])

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError("--batch-size must be >= 1")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError("--max-length must be >= 2")
