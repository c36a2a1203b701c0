"""Supervised fine-tuning: `finegrain sft` as a function.

Read top to bottom: data (records -> tokenised examples with a response-only label mask), model
(a causal LM loaded by name, or with ``from_scratch`` a byte-level BPE tokenizer trained on the
data and a tiny GPT-2 built from its config), then the loss of a micro-batch (token-mean
cross-entropy on response tokens) handed to the supervised loop shared with the reward-model
trainer (:class:`finegrain.training.SupervisedLoop`: steps, metrics, resumable checkpoints), and
the final checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..config import to_dict
from ..errors import InputError
from ..tokens import format_prompt
from ..models import clamp_max_length, load_dtype, load_model, load_tokenizer, pick_attention
from ..scratch import tiny_gpt2_config, train_bpe_tokenizer
from ..speed import keep_freed_memory
from ..training import (SupervisedLoop, SupervisedStage, checkpoint_dirs, fingerprint, held_out,
                        refuse_stale_checkpoints, save_model_into)
from ..tracking import MetricsLog, resolve_log_with
from .config import DEFAULT_MAX_LENGTH, SFTConfig
from .data import IGNORE_INDEX, SFTBatch, SFTExample, SFTRecord, build_sft_example, collate_sft, load_sft_records


def response_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions.

    logits: (B, L, V) at every position; labels: (B, L) with IGNORE_INDEX where no loss is taken.
    Position t predicts labels[t + 1] (the usual causal shift).
    """
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # (B*(L-1), V)
    shift_labels = labels[:, 1:].reshape(-1)                               # (B*(L-1),)
    return torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)


# ---------------------------------------------------------------- model and tokenizer
def scratch_tokenizer(cfg: SFTConfig, records: Sequence[SFTRecord]):
    """A byte-level BPE tokenizer trained on the formatted prompts and responses."""
    texts = [format_prompt(None, r.prompt, cfg.template, use_chat_template=False) + r.response for r in records]
    return train_bpe_tokenizer(texts, vocab_size=cfg.vocab_size)


def build_policy(cfg: SFTConfig, records: Sequence[SFTRecord], device_type: str = "cpu"):
    """(model, tokenizer): loaded from ``cfg.model``, or a tiny GPT-2 and a fresh tokenizer."""
    torch.manual_seed(cfg.seed)
    attn = pick_attention(cfg.attn_implementation, cfg.mixed_precision, device_type)
    if not cfg.from_scratch:
        tok = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
        model = load_model(cfg.model, "causal", tokenizer=tok, trust_remote_code=cfg.trust_remote_code,
                           dtype=load_dtype(cfg.dtype, cfg.model, cfg.trust_remote_code), attn_implementation=attn)
        return model, tok
    from transformers import GPT2LMHeadModel

    tok = scratch_tokenizer(cfg, records)
    config = tiny_gpt2_config(len(tok), n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                              n_positions=cfg.n_positions, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)
    kw = {"attn_implementation": attn} if attn is not None else {}
    return GPT2LMHeadModel._from_config(config, **kw).to(load_dtype(cfg.dtype, None)), tok


# ---------------------------------------------------------------- data
@dataclass
class SFTData:
    train: list[SFTExample]
    eval: list[SFTExample]
    n_skipped: int
    n_truncated: int
    fingerprint: str


def prepare_data(cfg: SFTConfig, records: Sequence[SFTRecord], n_skipped: int, tok, max_length: int) -> SFTData:
    train_r = [r for r in records if not held_out(r.id, cfg.eval_fraction, cfg.seed)]
    eval_r = [r for r in records if held_out(r.id, cfg.eval_fraction, cfg.seed)]
    if not train_r:
        raise InputError("no training records left after holding out --eval-fraction", path=cfg.data)
    enc = lambda rs: [build_sft_example(tok, r.prompt, r.response, max_length=max_length, template=cfg.template)  # noqa: E731
                      for r in rs]
    train, ev = enc(train_r), enc(eval_r)
    return SFTData(train, ev, n_skipped, sum(e.truncated for e in train + ev), data_fingerprint(cfg, train_r, tok))


def data_fingerprint(cfg: SFTConfig, records: Sequence[SFTRecord], tok) -> str:
    """Hash of what training reads, in order: each record's id, templated prompt and response (ids alone
    would let a resume carry on over texts fixed under the same ids)."""
    return fingerprint(json.dumps([r.id, format_prompt(tok, r.prompt, cfg.template), r.response])
                       for r in records)


def vocab_fingerprint(tok) -> str:
    """Hash of the vocabulary: a from-scratch tokenizer retrained on resume must be the same one."""
    return fingerprint([repr(sorted(tok.get_vocab().items()))])


def model_max_length(cfg: SFTConfig, model, *, given: bool = True) -> int:
    """--max-length, capped by the model's position limit when it has one (one warning line for a loaded
    model when the user gave the option, ``given``; a model built --from-scratch has the --n-positions it was
    asked for)."""
    if cfg.from_scratch:
        return min(cfg.max_length, cfg.n_positions)
    return clamp_max_length(cfg.max_length, cfg.model, config=model.config, warn=given)


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_loss(model, examples: Sequence[SFTExample], pad_id: int, batch_size: int, device) -> float:
    """Token-weighted mean response loss over ``examples``."""
    was = model.training
    model.eval()
    total, n = 0.0, 0
    for s in range(0, len(examples), batch_size):
        batch = collate_sft(examples[s:s + batch_size], pad_id).to(device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        k = batch.n_target_tokens
        total, n = total + response_loss(logits, batch.labels).item() * k, n + k
    model.train(was)
    return total / max(n, 1)


# ---------------------------------------------------------------- the loop
def train_sft(cfg: SFTConfig) -> dict:
    """Fine-tune (or train from scratch) a causal LM as ``cfg`` says; return a summary."""
    from accelerate import Accelerator

    given = cfg.max_length is not None  # (the default is cut to the model's positions without a warning)
    cfg = dataclasses.replace(cfg, max_length=cfg.max_length if given else DEFAULT_MAX_LENGTH)
    output = Path(cfg.output)
    refuse_stale_checkpoints(output, cfg.resume, checkpoint_dirs(output))
    rejects = output / "rejects.jsonl" if cfg.skip_invalid else None  # bad data fails first
    records, n_skipped = load_sft_records(cfg.data, skip_invalid=cfg.skip_invalid, rejects_path=rejects)
    accelerator = Accelerator(log_with=resolve_log_with(cfg.log_with) or None, project_dir=str(output),
                              mixed_precision=cfg.mixed_precision)
    keep_freed_memory(accelerator.device.type)
    model, tok = build_policy(cfg, records, accelerator.device.type)
    max_length = model_max_length(cfg, model, given=given)
    data = prepare_data(cfg, records, n_skipped, tok, max_length)
    loop = SupervisedLoop(cfg, output, accelerator, model, len(data.train))
    loop.resume({"data_fingerprint": data.fingerprint, "tokenizer": vocab_fingerprint(tok)},
                "the training records (ids or texts), the --template or the tokenizer differ from that run's "
                "(same --data, --template, --eval-fraction, --seed and model needed)")
    pad_id, world = tok.pad_token_id, accelerator.num_processes
    tokens, first_loss = [0], []

    def loss_of(local: list[int]):
        batch: SFTBatch = collate_sft([data.train[i] for i in local], pad_id).to(accelerator.device)
        logits = loop.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        tokens[0] += int(batch.attention_mask.sum())
        return response_loss(logits, batch.labels), {}

    def on_step(line: dict, seconds: float) -> None:
        line["tokens_per_s"] = tokens[0] * world / max(seconds, 1e-9)
        tokens[0] = 0
        if not first_loss:
            first_loss.append(line["loss"])

    def evaluate() -> dict[str, float]:
        return {"eval_loss": evaluate_loss(accelerator.unwrap_model(loop.model), data.eval, pad_id, cfg.batch_size,
                                           accelerator.device)}

    last = loop.run(SupervisedStage("sft", loss_of, evaluate=evaluate if data.eval else None, on_step=on_step))
    if loop.start:  # resumed: the run's first loss is in the lines the interrupted run logged
        logged = MetricsLog(output / "metrics.jsonl", enabled=False).read()
        if logged and logged[0].get("step") == 1:
            first_loss[:] = [logged[0]["loss"]]
    meta = {"kind": "policy", "stage": "sft", "data": cfg.data,
            "base_model": "tiny-gpt2 (from scratch)" if cfg.from_scratch else cfg.model, "template": cfg.template,
            "max_length": max_length, "n_train": len(data.train), "n_eval": len(data.eval),
            "n_skipped": data.n_skipped, "n_truncated": data.n_truncated, "steps": loop.steps,
            "first_loss": first_loss[0] if first_loss else None, "final_loss": last.get("loss"),
            "eval_loss": last.get("eval_loss"), "config": to_dict(cfg)}
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        save_model_into(output, accelerator.unwrap_model(loop.model), tok, meta)
    accelerator.end_training()
    return {"output": str(output), **{k: v for k, v in meta.items() if k != "config"}}
