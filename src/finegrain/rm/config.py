"""Options of `finegrain train-rm` and `finegrain eval-rm` (light module: no torch import)."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelOptions, PrecisionOptions, TrainingOptions, opt
from ..errors import ConfigError
from .losses import LOSSES, loss_names

DEFAULT_MAX_LENGTH = 1024
"""train-rm's ``--max-length`` when none is given (cut to a loaded model's positions without a warning)."""
U0_LABELS = {"good": 1.0, "neutral": 0.5, "none": None}
"""``--u0-label``: the target P(good) of unchanged tokens in the per-token label term (None: unlabelled)."""


@dataclass(kw_only=True)
class TrainRMConfig(TrainingOptions):
    """Train a sequence or token-level reward model on preference or edited pairs."""

    data: str = opt(help="training pairs: .jsonl/.json/.jsonl.gz/.parquet or a `datasets` name")
    model: str = opt(help="backbone to start from: hub name, local path (a causal LM such as an SFT policy "
                          "works: its backbone is loaded and a new one-label head added)")
    output: str = opt(help="output directory: the reward model checkpoint, metrics.jsonl, checkpoints/")
    loss: str = opt("token_edit", "; ".join(f"{name}: {spec.help} ({spec.kind} RM)" for name, spec in LOSSES.items()),
                    choices=list(LOSSES))
    pairs: str = opt("edit", "preference: chosen > rejected; edit: edited > rejected",
                     choices=["preference", "edit"])
    eval_data: str | None = opt(None, "held-out pairs (same format); default: split --eval-fraction off --data")
    eval_fraction: float = opt(0.05, "fraction of --data held out for evaluation when --eval-data is not given "
                                     "(by pair id, deterministic given --seed; 0 = no evaluation)")
    batch_size: int = opt(8, "pairs per micro-batch per process")
    max_length: int | None = opt(None, "maximum tokens per (prompt, response); the prompt is cut from the left "
                                       f"first (default: {DEFAULT_MAX_LENGTH}, or the model's positions when fewer)",
                                 ge=2)
    lr: float | None = opt(None, "peak learning rate (default: 1e-5 for a pretrained backbone, 1e-3 for a model "
                                 "built --from-scratch, which needs far larger steps)")
    eval_every: int = opt(50, "evaluate every N optimizer steps (0 = only at the end)", ge=0)
    eval_batch_size: int = opt(16, "pairs per batch when evaluating", ge=1)
    u0_weight: float = opt(0.0, "token losses: weight of a regulariser pulling the rewards of aligned unchanged (U0) "
                                "tokens of the two responses together, the assumption behind Eq. 3-4 "
                                "(0 = the paper's loss)", ge=0)
    label_weight: float = opt(0.0, f"{' / '.join(loss_names(kind='token', pairwise=True))}: weight of the per-token "
                                   "label term of --loss token_label added to the Bradley-Terry loss (0 = the paper's "
                                   "loss)", ge=0)
    u0_label: str = opt("good", "per-token labels: target of the unchanged (U0) tokens: good (the editor kept "
                                "them), neutral (P = 0.5, reward 0) or none (unlabelled)", choices=list(U0_LABELS))
    token_view: str = opt("causal", "token RMs on a decoder backbone: causal (token t's reward sees tokens up to t) "
                                    "or echo (the response is read twice and rewards taken on the second copy, so "
                                    "every reward sees the whole response; twice the response length). Encoders "
                                    "see the whole response anyway", choices=["causal", "echo"])
    from_scratch: str | None = opt(None, "build a new model from a config instead of loading --model's weights "
                                         "(--model then gives only the tokenizer and the default sizes): encoder "
                                         "(BERT: every token sees the whole input) or decoder (GPT-2)",
                                   choices=["encoder", "decoder"])
    n_layer: int | None = opt(None, "with --from-scratch: layers (default: as --model's config)", ge=1)
    n_head: int | None = opt(None, "with --from-scratch: attention heads (default: as --model's config)", ge=1)
    n_embd: int | None = opt(None, "with --from-scratch: hidden size (default: as --model's config)", ge=1)
    keep: str = opt("best", "which weights to save: best (the evaluation with the best --best-metric on the "
                            "held-out pairs; the last step when there are none) or last", choices=["best", "last"])
    best_metric: str = opt("loss", "held-out metric that picks the best evaluation: loss (lowest) or accuracy "
                                   "(highest; ties: the earlier step)", choices=["loss", "accuracy"])

    def validate(self) -> None:
        super().validate()
        bradley_terry = loss_names(kind="token", pairwise=True)
        if self.u0_weight and self.kind == "sequence":
            raise ConfigError(f"--u0-weight applies to token losses ({', '.join(bradley_terry)}), not --loss "
                              f"{self.loss}")
        if self.label_weight and self.loss not in bradley_terry:
            raise ConfigError(f"--label-weight adds the label term to {' or '.join(bradley_terry)} (--loss {self.loss} "
                              f"{'is that term' if LOSSES[self.loss].labels else 'has none'})")
        if self.token_view == "echo" and self.kind == "sequence":
            raise ConfigError("--token-view echo applies to token RMs; a sequence RM's score already sees the whole "
                              "response")
        sized = next((n for n in ("n_layer", "n_head", "n_embd") if getattr(self, n) is not None), None)
        if sized and not self.from_scratch:  # a loaded model keeps its own sizes: the option would do nothing
            raise ConfigError(f"--{sized.replace('_', '-')} applies with --from-scratch; --model {self.model} keeps "
                              "its own sizes")

    @property
    def kind(self) -> str:
        """The reward-model kind the loss needs."""
        return LOSSES[self.loss].kind

    @property
    def learning_rate(self) -> float:
        """--lr, or the default for the kind of start (pretrained weights or a new model)."""
        return self.lr if self.lr is not None else (1e-3 if self.from_scratch else 1e-5)


@dataclass(kw_only=True)
class EvalRMConfig(ModelOptions, PrecisionOptions):
    """Pairwise accuracy (and token AUROC) of a reward model."""

    model: str = opt(help="reward model directory written by `finegrain train-rm`")
    data: str = opt(help="pairs to evaluate: .jsonl/.json/.jsonl.gz/.parquet or a `datasets` name")
    output: str = opt(help="JSON file for the results (written atomically)")
    pairs: str = opt("edit", "preference: chosen > rejected; edit: edited > rejected", choices=["preference", "edit"])
    batch_size: int = opt(16, "responses per forward pass")
    max_length: int | None = opt(None, "maximum tokens per input (default: the value the model was trained with)")
    skip_invalid: bool = opt(False, "skip invalid records (listed in DATA.rejects.jsonl beside a local file) "
                                    "instead of stopping")
    flaw_threshold: float | None = opt(None, "token RMs: tokens with a reward below this are called flawed for the "
                                             "span and token precision/recall (default: the threshold train-rm "
                                             "chose on the RM's own training-side pairs, in its finegrain.json)")

    def validate(self) -> None:
        super().validate()
        if self.batch_size < 1:
            raise ConfigError("--batch-size must be >= 1")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError("--max-length must be >= 2")
