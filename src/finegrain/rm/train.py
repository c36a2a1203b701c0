"""Reward-model training: `finegrain train-rm` as a function.

Read top to bottom: data (pairs -> comparisons -> tokenised, aligned features, unchanged edits
dropped), model (a one-label token or sequence head on any backbone), evaluation and the best
weights kept, then the loss of a micro-batch (both sides in one forward) handed to the supervised
loop shared with sft (:class:`finegrain.training.SupervisedLoop`: steps, metrics, resumable
checkpoints), and the final checkpoint. Works unchanged under ``accelerate launch``
(data-parallel: each process takes its slice of every micro-batch).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..config import to_dict
from ..io import iter_records, read_json, write_json
from ..errors import ConfigError, InputError
from ..models import clamp_max_length, load_config, load_dtype, load_model, load_tokenizer, pick_attention, read_meta
from ..scratch import scratch_model
from ..speed import keep_freed_memory
from ..tracking import resolve_log_with
from ..training import (SupervisedLoop, SupervisedStage, checkpoint_dirs, fingerprint, refuse_stale_checkpoints,
                        save_model_into)
from .config import DEFAULT_MAX_LENGTH, U0_LABELS, TrainRMConfig
from .data import PairBatch, PairFeatures, collate_pairs, featurize, load_comparisons_report, split_by_id
from .losses import LOSSES, edit_token_labels, loss_names, mean_reward, token_label_loss, u0_consistency
from .inputs import check_view
from .model import ensure_distinct_pad, kind_of_checkpoint, model_outputs

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- objective
@dataclass(frozen=True)
class Objective:
    """What a training step minimises: a named loss plus optional weighted terms (rm/losses.py).

    loss:          a name of rm/losses.py LOSSES
    u0_weight:     weight of the U0-consistency regulariser (token losses)
    label_weight:  weight of the per-token label term added to token_mean / token_edit
    u0_target:     target P(good) of unchanged tokens in the label term (None: unlabelled)
    """

    loss: str
    u0_weight: float = 0.0
    label_weight: float = 0.0
    u0_target: float | None = 1.0

    @classmethod
    def of(cls, cfg: TrainRMConfig) -> "Objective":
        return cls(cfg.loss, cfg.u0_weight, cfg.label_weight, U0_LABELS[cfg.u0_label])

    @property
    def kind(self) -> str:
        return LOSSES[self.loss].kind


def pair_objective(obj: Objective, outputs: torch.Tensor,
                   batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, margin, components) of a pair batch; rows [0, B) better, [B, 2B) worse.

    outputs: (2B, L) token rewards for a token RM, (2B,) scores for a sequence RM.
    margin:  (B,) score(better) - score(worse) by the scoring rule (Eq. 1 mean for token RMs):
             what accuracy counts, whatever the loss.
    components: detached parts of the loss, for logging (``u0_gap``, ``label_loss``).
    """
    b = batch.n_pairs
    if obj.loss not in LOSSES:
        raise ConfigError(f"unknown loss {obj.loss!r}")
    spec = LOSSES[obj.loss]
    resp, u1 = batch.inputs.response_mask, batch.u1_mask
    if spec.kind == "sequence":
        return spec.pair_term(outputs, resp, u1, b), outputs[:b] - outputs[b:], {}
    margin = mean_reward(outputs[:b], resp[:b]) - mean_reward(outputs[b:], resp[b:])
    parts: dict[str, torch.Tensor] = {}
    loss = spec.pair_term(outputs, resp, u1, b) if spec.pair_term else outputs.new_zeros(())
    label_weight = 1.0 if spec.labels else obj.label_weight
    if label_weight:
        targets, weights = edit_token_labels(resp, u1, b, obj.u0_target)
        label = token_label_loss(outputs, targets, weights)
        loss = loss + label_weight * label
        parts["label_loss"] = label.detach()
    gap = u0_consistency(outputs[:b], batch.u0_better, outputs[b:], batch.u0_worse, batch.u0_mask)
    if obj.u0_weight:
        loss = loss + obj.u0_weight * gap
    parts["u0_gap"] = gap.detach()
    return loss, margin, parts


def accuracy(margin: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs ranked right; ties count one half.  (B,) -> ()"""
    return ((margin > 0).float() + 0.5 * (margin == 0).float()).mean()


# ---------------------------------------------------------------- data
@dataclass
class RMData:
    train: list[PairFeatures]
    eval: list[PairFeatures]
    n_dropped_unchanged: int
    n_dropped_unchanged_eval: int
    n_rejected: int
    n_dropped_truncated: int = 0  # of n_dropped_unchanged: identical only because the edit lies beyond max_length

    def fingerprint(self) -> str:
        """Hash of what training reads, in order: each pair's id, token ids and changed-token marks (ids alone
        would let a resume carry on over texts fixed under the same ids)."""
        return fingerprint(json.dumps([f.id, f.better.input_ids, f.worse.input_ids, f.u1_better, f.u1_worse])
                           for f in self.train)


def prepare_data(cfg: TrainRMConfig, tokenizer) -> RMData:
    """Load, split, tokenise and align the pairs; drop unchanged ones."""
    rejects = str(Path(cfg.output) / "rejects.jsonl") if cfg.skip_invalid else None
    items, report = load_comparisons_report(cfg.data, cfg.pairs, skip_invalid=cfg.skip_invalid, rejects_path=rejects)
    dropped, dropped_eval, rejected = report.n_unchanged, 0, report.n_rejected
    if cfg.eval_data:
        train_items = items
        eval_rejects = str(Path(cfg.output) / "rejects_eval.jsonl") if cfg.skip_invalid else None
        eval_items, eval_report = load_comparisons_report(cfg.eval_data, cfg.pairs, skip_invalid=cfg.skip_invalid,
                                                          rejects_path=eval_rejects)
        dropped_eval += eval_report.n_unchanged
        rejected += eval_report.n_rejected
    else:
        train_items, eval_items = split_by_id(items, cfg.eval_fraction, cfg.seed)
    kw = dict(max_length=cfg.max_length, template=cfg.template, view=cfg.token_view, with_offsets=False)
    train, n, cut = featurize(tokenizer, train_items, **kw)
    ev, n_eval, cut_eval = featurize(tokenizer, eval_items, **kw)
    dropped, dropped_eval = dropped + n, dropped_eval + n_eval
    if not train:
        held = "" if cfg.eval_data or not eval_items else (
            f", {len(eval_items)} held out for evaluation by --eval-fraction {cfg.eval_fraction:g}: lower it, "
            "or give --eval-data")
        raise InputError(f"no training pairs left ({dropped} dropped because both responses are identical{held})",
                         path=cfg.data)
    if cut + cut_eval:
        logger.warning("%d pairs dropped: their edit lies beyond --max-length %d (raise it to keep them)",
                       cut + cut_eval, cfg.max_length)
    return RMData(train, ev, dropped, dropped_eval, rejected, cut + cut_eval)


# ---------------------------------------------------------------- model and optimisation
def check_model_kind(cfg: TrainRMConfig) -> None:
    """Refuse a token loss on a sequence RM checkpoint and vice versa."""
    if not os.path.isdir(cfg.model):
        return
    have = kind_of_checkpoint(cfg.model)
    if have is not None and have != cfg.kind:
        need = "--loss " + " or ".join(loss_names(kind=have))
        raise ConfigError(f"--loss {cfg.loss} needs a {cfg.kind} reward model but {cfg.model} is a {have} reward "
                          f"model; use {need}, or start from its base (causal LM) model")


def build_model(cfg: TrainRMConfig, tok, device_type: str = "cpu"):
    """Model with a fresh one-label head of the kind the loss needs (sequence RMs get a distinct pad).

    With ``--from-scratch`` a new encoder or decoder is built from a config (sizes as --model's
    unless given) for --model's tokenizer; otherwise --model's backbone is loaded.
    """
    torch.manual_seed(cfg.seed)
    attn = pick_attention(cfg.attn_implementation, cfg.mixed_precision, device_type)
    if cfg.from_scratch:
        base = load_config(cfg.model, cfg.trust_remote_code)
        sizes = {k: getattr(cfg, k) or getattr(base, attr) for k, attr in
                 (("n_layer", "num_hidden_layers"), ("n_head", "num_attention_heads"), ("n_embd", "hidden_size"))}
        model = scratch_model(cfg.from_scratch, cfg.kind, tok, n_positions=cfg.max_length, attn_implementation=attn,
                              dtype=load_dtype(cfg.dtype, None), **sizes)
    else:
        model = load_model(cfg.model, cfg.kind, tokenizer=tok, trust_remote_code=cfg.trust_remote_code,
                           dtype=load_dtype(cfg.dtype, cfg.model, cfg.trust_remote_code), attn_implementation=attn)
    if cfg.kind == "sequence":
        ensure_distinct_pad(tok, model)
    return model


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_pairs(model, obj: Objective, features: Sequence[PairFeatures], pad_id: int, batch_size: int,
                   device) -> dict[str, float]:
    """Mean loss, accuracy (ties = 1/2), margin (and the token losses' parts) over ``features``."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    n = 0
    for s in range(0, len(features), batch_size):
        batch = collate_pairs(features[s:s + batch_size], pad_id).to(device)
        out = model_outputs(model, obj.kind, batch.inputs.input_ids, batch.inputs.attention_mask).float()
        loss, margin, parts = pair_objective(obj, out, batch)
        k = batch.n_pairs
        for name, v in {"loss": loss, "accuracy": accuracy(margin), "margin": margin.mean(), **parts}.items():
            sums[name] = sums.get(name, 0.0) + v.item() * k
        n += k
    model.train(was_training)
    return {f"eval_{name}": v / n for name, v in sums.items()} if n else {}


class BestKeeper:
    """Keeps the weights of the best held-out evaluation in ``OUTPUT/best/`` (safetensors + best.json).

    ``metric`` is an ``evaluate_pairs`` key without its ``eval_`` prefix: ``loss`` (lower is better) or
    ``accuracy`` (higher); a tie keeps the earlier step. The record survives a resume; the folder is
    removed once the final model (those weights) is saved.
    """

    def __init__(self, output: Path, metric: str, *, resume: bool, main_process: bool):
        self.dir, self.key, self.sign = output / "best", f"eval_{metric}", -1.0 if metric == "loss" else 1.0
        self.main = main_process
        self.record: dict | None = None
        old = self.dir.with_name(".best.old")
        if resume and self.main and not (self.dir / "best.json").exists() and (old / "best.json").exists():
            old.rename(self.dir)  # a crash between the two renames of offer(): the previous best is still whole
        if resume and (self.dir / "best.json").exists():
            self.record = read_json(self.dir / "best.json")
        elif self.main and self.dir.exists():
            shutil.rmtree(self.dir)  # another run's best weights

    def offer(self, step: int, metrics: dict, accelerator, model) -> None:
        """Save the model when ``metrics`` beats the best so far (all processes call this)."""
        value = metrics.get(self.key)
        if value is None or not math.isfinite(value) or (
                self.record is not None and self.sign * value <= self.sign * self.record["value"]):
            return  # a NaN evaluation is never the best (and would make any later value beat it)
        self.record = {"step": step, "metric": self.key, "value": value}
        accelerator.wait_for_everyone()
        if self.main:
            from safetensors.torch import save_model

            tmp = self.dir.with_name(".best.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_model(accelerator.unwrap_model(model), str(tmp / "model.safetensors"))
            write_json(tmp / "best.json", self.record)
            old = self.dir.with_name(".best.old")  # the previous best stays whole until the new one is in place
            shutil.rmtree(old, ignore_errors=True)
            if self.dir.exists():
                self.dir.rename(old)
            tmp.rename(self.dir)
            shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    def restore(self, model) -> dict | None:
        """Load the best weights into ``model`` (unwrapped); the record, or None when nothing was kept."""
        if self.record is None:
            return None
        from safetensors.torch import load_model

        load_model(model, str(self.dir / "model.safetensors"), device=str(next(model.parameters()).device))
        return self.record


@torch.no_grad()
def calibrate_flaw_threshold(model, kind: str, features: Sequence[PairFeatures], pad_id: int, batch_size: int,
                             device) -> float | None:
    """The reward below which a token is called flawed: the threshold with the best token F1 against the
    changed (U1) tokens of the worse responses of ``features`` (train-rm's held-out split when it has one, else
    its training pairs: never eval-rm's data, unless a user gives eval-rm the same file, which it warns about)."""
    from .evaluate import best_f1_threshold

    if kind != "token" or not features:
        return None
    was_training = model.training
    model.eval()
    scores, labels = [], []
    for s in range(0, len(features), batch_size):
        chunk = features[s:s + batch_size]
        batch = collate_pairs(chunk, pad_id).to(device)
        out = model_outputs(model, kind, batch.inputs.input_ids, batch.inputs.attention_mask).float()
        for k, f in enumerate(chunk):
            ex = f.worse
            scores += out[len(chunk) + k, ex.response_start:ex.response_end].tolist()
            labels += list(f.u1_worse)
    model.train(was_training)
    return best_f1_threshold(scores, labels)


# ---------------------------------------------------------------- the loop
def pair_loss(cfg: TrainRMConfig, model, features: Sequence[PairFeatures], pad_id: int, device):
    """The loss of one micro-batch of pairs (indices into ``features``) and its statistics, for the supervised loop."""
    obj = Objective.of(cfg)

    def loss_of(local: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch = collate_pairs([features[i] for i in local], pad_id).to(device)
        out = model_outputs(model, cfg.kind, batch.inputs.input_ids, batch.inputs.attention_mask).float()
        loss, margin, parts = pair_objective(obj, out, batch)
        return loss, {"accuracy": accuracy(margin.detach()), "margin": margin.detach().mean(), **parts}

    return loss_of


def final_meta(cfg: TrainRMConfig, data: RMData, steps: int, last: dict, max_length: int) -> dict:
    """What finegrain.json records about a trained reward model."""
    init_meta = read_meta(cfg.model) if os.path.isdir(cfg.model) else {}
    return {"kind": cfg.kind, "loss": cfg.loss, "pairs": cfg.pairs, "data": cfg.data, "eval_data": cfg.eval_data,
            "base_model": init_meta.get("base_model", cfg.model), "init_model": cfg.model,
            "token_view": cfg.token_view if cfg.kind == "token" else None,
            "architecture": f"{cfg.from_scratch} from scratch" if cfg.from_scratch else "pretrained",
            "max_length": max_length, "template": cfg.template, "n_train": len(data.train),
            "n_eval": len(data.eval), "n_dropped_unchanged": data.n_dropped_unchanged,
            "n_dropped_unchanged_eval": data.n_dropped_unchanged_eval,
            "n_dropped_truncated": data.n_dropped_truncated, "n_rejected": data.n_rejected,
            "steps": steps, "lr": cfg.learning_rate, **{k: v for k, v in last.items() if k.startswith("eval_")},
            "config": to_dict(cfg)}


def warn_if_still_improving(curve: list[dict], cfg: TrainRMConfig) -> bool:
    """One warning line when the held-out loss fell at each of the last two evaluations: likely underfit."""
    losses = [c["eval_loss"] for c in curve if "eval_loss" in c]
    if len(losses) < 3 or not losses[-1] < losses[-2] < losses[-3]:
        return False
    logger.warning("the held-out loss was still falling at the last evaluation (%.4f -> %.4f -> %.4f): the reward "
                   "model may be undertrained; raise --epochs or --lr (now %g)", losses[-3], losses[-2], losses[-1],
                   cfg.learning_rate)
    return True


def read_eval_curve(path: Path) -> list[dict]:
    """The held-out evaluations of a run (step and eval_* values), from its metrics.jsonl."""
    if not path.exists():
        return []
    return [{k: v for k, v in rec.items() if k == "step" or k.startswith("eval_")}
            for _, rec in iter_records(str(path)) if any(k.startswith("eval_") for k in rec)]


def kept_metrics(path: Path, step: int) -> dict:
    """The eval_* values of the evaluation at ``step`` (those of the weights that were kept)."""
    return next((c for c in read_eval_curve(path) if c["step"] == step), {})


def train_reward_model(cfg: TrainRMConfig) -> dict:
    """Train a reward model as ``cfg`` says; return a summary (also stored in finegrain.json)."""
    from accelerate import Accelerator

    check_model_kind(cfg)
    output = Path(cfg.output)
    refuse_stale_checkpoints(output, cfg.resume, checkpoint_dirs(output))
    tok = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    check_view(tok, cfg.token_view)
    # the values used, not None, in the summary, finegrain.json and checkpoints: the default learning rate of this
    # start, and --max-length (a new model is built with that many positions; a loaded one's limit caps it, said
    # only when --max-length was given)
    max_length = cfg.max_length if cfg.max_length is not None else DEFAULT_MAX_LENGTH
    if not cfg.from_scratch:
        max_length = clamp_max_length(max_length, cfg.model, cfg.trust_remote_code, warn=cfg.max_length is not None)
    cfg = dataclasses.replace(cfg, lr=cfg.learning_rate, max_length=max_length)
    data = prepare_data(cfg, tok)                       # bad data fails before any model is loaded
    accelerator = Accelerator(log_with=resolve_log_with(cfg.log_with) or None, project_dir=str(output),
                              mixed_precision=cfg.mixed_precision)
    keep_freed_memory(accelerator.device.type)
    model = build_model(cfg, tok, accelerator.device.type)
    loop = SupervisedLoop(cfg, output, accelerator, model, len(data.train), lr=cfg.learning_rate)
    start = loop.resume({"data_fingerprint": data.fingerprint()},
                        "the training pairs (ids or texts) differ from that run's (same --data, --eval-fraction and --seed "
                        "needed)")
    model, pad_id = loop.model, tok.pad_token_id
    best = BestKeeper(output, cfg.best_metric, resume=cfg.resume and start > 0,
                      main_process=accelerator.is_main_process)

    def evaluate() -> dict[str, float]:
        return evaluate_pairs(accelerator.unwrap_model(model), Objective.of(cfg), data.eval, pad_id,
                              cfg.eval_batch_size, accelerator.device)

    def keep_best(step: int, line: dict) -> None:
        best.offer(step, line, accelerator, model)

    stage = SupervisedStage("train-rm", pair_loss(cfg, model, data.train, pad_id, accelerator.device),
                            evaluate=evaluate if data.eval else None, eval_every=cfg.eval_every,
                            on_eval=keep_best if cfg.keep == "best" else None,
                            postfix=lambda line: {"loss": f"{line['loss']:.3f}", "acc": f"{line['accuracy']:.2f}"})
    last = loop.run(stage)
    meta = final_meta(cfg, data, loop.steps, last, cfg.max_length)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(model)
        kept = best.restore(final) if cfg.keep == "best" else None
        meta.update(kept_step=kept["step"] if kept else loop.steps, kept_by=kept["metric"] if kept else "last",
                    eval_curve=read_eval_curve(output / "metrics.jsonl"))
        if kept:
            meta.update({k: v for k, v in kept_metrics(output / "metrics.jsonl", kept["step"]).items() if k != "step"})
        meta["flaw_threshold"] = calibrate_flaw_threshold(final, cfg.kind, data.eval or data.train, pad_id,
                                                          cfg.eval_batch_size, accelerator.device)
        meta["flaw_threshold_from"] = "held-out split" if data.eval else "training pairs"
        warn_if_still_improving(meta["eval_curve"], cfg)
        save_model_into(output, final, tok, meta)
        shutil.rmtree(best.dir, ignore_errors=True)
    accelerator.end_training()
    return {"output": str(output), **{k: v for k, v in meta.items() if k != "config"},
            "final_loss": last.get("loss"), "final_accuracy": last.get("accuracy")}
