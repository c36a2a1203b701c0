"""Reward-model training: `finegrain train-rm` as a function.

Read top to bottom: data (pairs -> comparisons -> tokenised, aligned features, unchanged edits
dropped), model (a one-label token or sequence head on any backbone), the deterministic
micro-batch plan, then the loop (forward both sides in one batch -> loss -> step), with
evaluation, metrics, resumable checkpoints and the final checkpoint. Works unchanged under
``accelerate launch`` (data-parallel: each process takes its slice of every micro-batch).
"""
from __future__ import annotations

import contextlib
import logging
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..config import to_dict
from ..errors import ConfigError, InputError
from ..models import load_model, load_tokenizer, pick_attention, read_meta
from ..tracking import MetricsLog, init_trackers, progress, resolve_log_with
from ..training import (build_optimizer, check_finite, checkpoint_dirs, keep_freed_memory, load_training_state,
                        micro_batch_plan, refuse_stale_checkpoints, save_model_into, save_training_state)
from .config import TrainRMConfig
from .data import PairBatch, PairFeatures, collate_pairs, featurize, load_comparisons_report, split_by_id
from .losses import mean_reward, sequence_loss, token_edit_loss, token_mean_loss, u0_consistency
from .model import ensure_distinct_pad, kind_of_checkpoint, model_outputs

logger = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------- objective
def pair_objective(loss_name: str, outputs: torch.Tensor, batch: PairBatch,
                   u0_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, margin, components) of a pair batch; rows [0, B) better, [B, 2B) worse.

    outputs: (2B, L) token rewards for a token RM, (2B,) scores for a sequence RM.
    margin:  (B,) score(better) - score(worse) by the scoring rule (Eq. 1 mean for token RMs):
             what accuracy counts, whatever the loss.
    components: detached parts of the loss, for logging (``u0_gap`` for token RMs).
    """
    b = batch.n_pairs
    if loss_name == "sequence":
        margin = outputs[:b] - outputs[b:]
        return sequence_loss(outputs[:b], outputs[b:]), margin, {}
    resp, u1 = batch.inputs.response_mask, batch.u1_mask
    margin = mean_reward(outputs[:b], resp[:b]) - mean_reward(outputs[b:], resp[b:])
    if loss_name == "token_mean":
        loss = token_mean_loss(outputs[:b], resp[:b], outputs[b:], resp[b:])
    elif loss_name == "token_edit":
        loss = token_edit_loss(outputs[:b], resp[:b], u1[:b], outputs[b:], resp[b:], u1[b:])
    else:
        raise ConfigError(f"unknown loss {loss_name!r}")
    gap = u0_consistency(outputs[:b], batch.u0_better, outputs[b:], batch.u0_worse, batch.u0_mask)
    if u0_weight:
        loss = loss + u0_weight * gap
    return loss, margin, {"u0_gap": gap.detach()}


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
        return hashlib.sha256("\n".join(f.id for f in self.train).encode()).hexdigest()[:16]


def prepare_data(cfg: TrainRMConfig, tokenizer) -> RMData:
    """Load, split, tokenise and align the pairs; drop unchanged ones."""
    rejects = str(Path(cfg.output) / "rejects.jsonl") if cfg.skip_invalid else None
    items, report = load_comparisons_report(cfg.data, cfg.pairs, skip_invalid=cfg.skip_invalid, rejects_path=rejects)
    dropped, dropped_eval = report.n_unchanged, 0
    if cfg.eval_data:
        train_items = items
        eval_items, eval_report = load_comparisons_report(cfg.eval_data, cfg.pairs, skip_invalid=cfg.skip_invalid)
        dropped_eval += eval_report.n_unchanged
    else:
        train_items, eval_items = split_by_id(items, cfg.eval_fraction, cfg.seed)
    kw = dict(max_length=cfg.max_length, template=cfg.template)
    train, n, cut = featurize(tokenizer, train_items, **kw)
    ev, n_eval, cut_eval = featurize(tokenizer, eval_items, **kw)
    dropped, dropped_eval = dropped + n, dropped_eval + n_eval
    if not train:
        raise InputError(f"no training pairs left ({dropped} dropped because both responses are identical)",
                         path=cfg.data)
    if cut + cut_eval:
        logger.warning("%d pairs dropped: their edit lies beyond --max-length %d (raise it to keep them)",
                       cut + cut_eval, cfg.max_length)
    return RMData(train, ev, dropped, dropped_eval, report.n_rejected, cut + cut_eval)


# ---------------------------------------------------------------- model and optimisation
def check_model_kind(cfg: TrainRMConfig) -> None:
    """Refuse a token loss on a sequence RM checkpoint and vice versa."""
    if not os.path.isdir(cfg.model):
        return
    have = kind_of_checkpoint(cfg.model)
    if have is not None and have != cfg.kind:
        need = "--loss token_mean or token_edit" if have == "token" else "--loss sequence"
        raise ConfigError(f"--loss {cfg.loss} needs a {cfg.kind} reward model but {cfg.model} is a {have} reward "
                          f"model; use {need}, or start from its base (causal LM) model")


def build_model(cfg: TrainRMConfig, tok, device_type: str = "cpu"):
    """Model with a fresh one-label head of the kind the loss needs (sequence RMs get a distinct pad)."""
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model, cfg.kind, tokenizer=tok, trust_remote_code=cfg.trust_remote_code,
                       dtype=DTYPES[cfg.dtype],
                       attn_implementation=pick_attention(cfg.attn_implementation, cfg.mixed_precision, device_type))
    if cfg.kind == "sequence":
        ensure_distinct_pad(tok, model)
    return model


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_pairs(model, loss_name: str, kind: str, features: Sequence[PairFeatures], pad_id: int,
                   batch_size: int, device, u0_weight: float = 0.0) -> dict[str, float]:
    """Mean loss, accuracy (ties = 1/2), margin (and U0 gap for token RMs) over ``features``."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    n = 0
    for s in range(0, len(features), batch_size):
        batch = collate_pairs(features[s:s + batch_size], pad_id).to(device)
        out = model_outputs(model, kind, batch.inputs.input_ids, batch.inputs.attention_mask).float()
        loss, margin, parts = pair_objective(loss_name, out, batch, u0_weight)
        k = batch.n_pairs
        for name, v in {"loss": loss, "accuracy": accuracy(margin), "margin": margin.mean(), **parts}.items():
            sums[name] = sums.get(name, 0.0) + v.item() * k
        n += k
    model.train(was_training)
    return {f"eval_{name}": v / n for name, v in sums.items()} if n else {}


# ---------------------------------------------------------------- the loop
def _train_step(cfg: TrainRMConfig, accelerator, model, optimizer, scheduler, features: list[PairFeatures],
                group: list[list[int]], pad_id: int) -> dict[str, float]:
    """One optimizer step over ``grad_accum`` micro-batches; this process takes its slice of each."""
    rank, world = accelerator.process_index, accelerator.num_processes
    stats = torch.zeros(4, device=accelerator.device)  # loss, accuracy, margin, u0 gap (means over micro-batches)
    for k, mb in enumerate(group):
        local = mb[rank::world] or mb[:1]
        batch = collate_pairs([features[i] for i in local], pad_id).to(accelerator.device)
        sync = k == len(group) - 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(model):
            out = model_outputs(model, cfg.kind, batch.inputs.input_ids, batch.inputs.attention_mask).float()
            loss, margin, parts = pair_objective(cfg.loss, out, batch, cfg.u0_weight)
            accelerator.backward(loss / len(group))
        gap = parts.get("u0_gap", torch.zeros((), device=loss.device))
        stats += torch.stack([loss.detach(), accuracy(margin.detach()), margin.detach().mean(), gap]) / len(group)
    grad_norm = None
    if cfg.max_grad_norm > 0:
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    stats = accelerator.reduce(stats, reduction="mean")
    out = {"loss": stats[0].item(), "accuracy": stats[1].item(), "margin": stats[2].item(),
           "lr": scheduler.get_last_lr()[0]}
    if cfg.kind == "token":
        out["u0_gap"] = stats[3].item()
    if grad_norm is not None:
        out["grad_norm"] = float(grad_norm)
    return out


def _resume_point(cfg: TrainRMConfig, accelerator, model, optimizer, scheduler, data: RMData) -> int:
    """Step to start from: 0, or the newest checkpoint's step when --resume."""
    ckpts = checkpoint_dirs(Path(cfg.output) / "checkpoints")
    if not cfg.resume or not ckpts:
        return 0
    state = load_training_state(ckpts[-1], accelerator, model, optimizer, scheduler)
    if state.get("data_fingerprint") != data.fingerprint():
        raise ConfigError(f"cannot resume from {ckpts[-1]}: the training pairs differ from that run's "
                          "(same --data, --eval-fraction and --seed needed)")
    return int(state["step"])


def final_meta(cfg: TrainRMConfig, data: RMData, steps: int, last: dict) -> dict:
    """What finegrain.json records about a trained reward model."""
    init_meta = read_meta(cfg.model) if os.path.isdir(cfg.model) else {}
    return {"kind": cfg.kind, "loss": cfg.loss, "pairs": cfg.pairs, "data": cfg.data, "eval_data": cfg.eval_data,
            "base_model": init_meta.get("base_model", cfg.model), "init_model": cfg.model,
            "max_length": cfg.max_length, "template": cfg.template, "n_train": len(data.train),
            "n_eval": len(data.eval), "n_dropped_unchanged": data.n_dropped_unchanged,
            "n_dropped_unchanged_eval": data.n_dropped_unchanged_eval,
            "n_dropped_truncated": data.n_dropped_truncated, "n_rejected": data.n_rejected,
            "steps": steps, **{k: v for k, v in last.items() if k.startswith("eval_")}, "config": to_dict(cfg)}


def train_reward_model(cfg: TrainRMConfig) -> dict:
    """Train a reward model as ``cfg`` says; return a summary (also stored in finegrain.json)."""
    from accelerate import Accelerator

    check_model_kind(cfg)
    output = Path(cfg.output)
    refuse_stale_checkpoints(output, cfg.resume, checkpoint_dirs(output / "checkpoints"))
    tok = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    data = prepare_data(cfg, tok)                       # bad data fails before any model is loaded
    accelerator = Accelerator(log_with=resolve_log_with(cfg.log_with) or None, project_dir=str(output),
                              mixed_precision=cfg.mixed_precision)
    keep_freed_memory(accelerator.device.type)
    model = build_model(cfg, tok, accelerator.device.type)
    plan = micro_batch_plan(len(data.train), cfg.batch_size * accelerator.num_processes, cfg.epochs, cfg.seed)
    groups = [plan[i:i + cfg.grad_accum] for i in range(0, len(plan), cfg.grad_accum)]
    optimizer, scheduler = build_optimizer(cfg, model, len(groups))
    model, optimizer = accelerator.prepare(model, optimizer)
    start = _resume_point(cfg, accelerator, model, optimizer, scheduler, data)
    metrics = MetricsLog(output / "metrics.jsonl", resume_from_step=start + 1 if cfg.resume else None,
                         enabled=accelerator.is_main_process)
    init_trackers(accelerator, "train-rm", to_dict(cfg))
    pad_id, last = tok.pad_token_id, {}

    def eval_fn() -> dict[str, float]:
        return evaluate_pairs(accelerator.unwrap_model(model), cfg.loss, cfg.kind, data.eval, pad_id,
                              cfg.eval_batch_size, accelerator.device, cfg.u0_weight)

    bar = progress(total=len(groups), initial=start, desc="train-rm",
                   disable=None if accelerator.is_main_process else True)
    model.train()
    for step in range(start + 1, len(groups) + 1):
        last = {"step": step, "epoch": round(step / len(groups) * cfg.epochs, 4)}
        last.update(_train_step(cfg, accelerator, model, optimizer, scheduler, data.train, groups[step - 1], pad_id))
        check_finite(step, last, fp16=cfg.mixed_precision == "fp16")
        if data.eval and ((cfg.eval_every and step % cfg.eval_every == 0) or step == len(groups)):
            last.update(eval_fn())
        metrics.log(last)
        accelerator.log({k: v for k, v in last.items() if k != "step"}, step=step)
        bar.update(1)
        bar.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{last['accuracy']:.2f}")
        if cfg.save_every and step % cfg.save_every == 0 and step < len(groups):
            save_training_state(output / "checkpoints", step, accelerator, model, optimizer, scheduler,
                                {"data_fingerprint": data.fingerprint()}, keep=cfg.keep_checkpoints)
    bar.close()
    meta = final_meta(cfg, data, len(groups), last)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_model_into(output, accelerator.unwrap_model(model), tok, meta)
    accelerator.end_training()
    return {"output": str(output), **{k: v for k, v in meta.items() if k != "config"},
            "final_loss": last.get("loss"), "final_accuracy": last.get("accuracy")}
