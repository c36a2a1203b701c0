"""The peer: TRL 1.12's own PPOTrainer and RewardTrainer on the shared benchmark assets.

TRL runs exactly as its documentation sets it up; the only settings changed from its defaults
are the ones that make the two sides do the same work on a CPU:
- ``bf16=False`` and ``gradient_checkpointing=False`` (its defaults are True; finegrain trains
  in fp32 without checkpointing here, and both settings change speed, not the algorithm);
- ``stop_token=None`` so every response is exactly ``response_length`` tokens (TRL's default);
- ``num_sample_generations=0`` and ``report_to="none"`` (no debugging samples, no trackers);
- the rollout batch is ``per_device_train_batch_size * gradient_accumulation_steps`` rows (TRL's
  definition), here ``batch_size * 1``, split into ``num_mini_batches`` minibatches of one optimizer
  step each, as finegrain's (accumulating over the minibatches would make one step per epoch).
Step times come from a ``TrainerCallback.on_step_end`` clock: one PPO step = one rollout batch
(generation, reference/value/reward passes, GAE) plus all its PPO epochs.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from common import peak_rss_gb, read_jsonl


def _clock_callback():
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.t0 = None
            self.ends: list[float] = []
            self.rss_gb: list[float] = []

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())
            self.rss_gb.append(peak_rss_gb())

        def step_times(self) -> list[float]:
            marks = [self.t0] + self.ends
            return [b - a for a, b in zip(marks, marks[1:])]

    return Clock()


def _prompt_ids(tok, assets: Path) -> list[list[int]]:
    from finegrain.tokens import encode_prompts, format_prompt

    prompts = [r["prompt"] for r in read_jsonl(assets / "prompts.jsonl")]
    return encode_prompts(tok, [format_prompt(tok, p) for p in prompts])  # as finegrain builds its queries


def run_ppo(assets: Path, *, steps: int, batch_size: int, response_length: int, ppo_epochs: int,
            num_minibatches: int, seed: int, learning_rate: float, temperature: float, kl_coef: float,
            mixed_precision: str = "no", use_lora: bool = False, lora_r: int = 16, lora_alpha: int = 32,
            lora_target_modules: list[str] | None = None, policy: str = "policy",
            matched: bool = False) -> dict[str, Any]:
    """Train TRL's PPOTrainer for ``steps`` PPO steps; returns per-step wall times.

    ``matched`` (with bf16): TRL given what finegrain's bf16 run has, beyond TRL's own bf16 mode, which
    autocasts only the update's forward (:func:`_match_finegrain_bf16`).

    ``use_lora`` passes a peft ``LoraConfig`` and no reference model: TRL's documented LoRA setup,
    where the reference is the policy with its adapters disabled (the value model stays full).

    ``mixed_precision="bf16"`` runs it under bf16 autocast. Its ``bf16`` flag alone does not: the
    PPOTrainer builds its own ``Accelerator`` without a precision, which then reads
    ``ACCELERATE_MIXED_PRECISION``; so both are set.
    """
    import os

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tok = AutoTokenizer.from_pretrained(assets / "tokenizer")
    tok.padding_side = "left"  # TRL's queries are left-padded
    ids = _prompt_ids(tok, assets)
    train = Dataset.from_dict({"input_ids": ids})
    evald = Dataset.from_dict({"input_ids": ids[:batch_size]})
    policy_dir = assets / policy
    bf16 = mixed_precision == "bf16"
    if matched and not bf16:
        raise ValueError("matched=True is TRL given finegrain's bf16 setting: it needs mixed_precision='bf16'")
    # matched: the attention kernel finegrain's --attn-implementation auto picks under bf16 on a CPU (eager), and the
    # frozen reference and reward model held in bf16 as finegrain holds them
    attn = {"attn_implementation": "eager"} if matched else {}
    frozen = {"dtype": torch.bfloat16} if matched else {}
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, **attn)
    ref, peft_config = None, None
    if use_lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0,
                                 target_modules=lora_target_modules, task_type="CAUSAL_LM")
    else:
        ref = AutoModelForCausalLM.from_pretrained(policy_dir, **attn, **frozen)
    value = AutoModelForSequenceClassification.from_pretrained(assets / "rm_seq", num_labels=1, **attn)
    reward = AutoModelForSequenceClassification.from_pretrained(assets / "rm_seq", num_labels=1, **attn, **frozen)
    if matched:
        _match_finegrain_bf16()
    if bf16:
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"
    with tempfile.TemporaryDirectory() as tmp:
        args = PPOConfig(
            output_dir=tmp, per_device_train_batch_size=batch_size, gradient_accumulation_steps=1,
            num_mini_batches=num_minibatches, num_ppo_epochs=ppo_epochs, response_length=response_length,
            total_episodes=batch_size * steps, local_rollout_forward_batch_size=batch_size,
            temperature=temperature, kl_coef=kl_coef, learning_rate=learning_rate, stop_token=None,
            missing_eos_penalty=None, num_sample_generations=0, report_to="none", bf16=bf16,
            gradient_checkpointing=False, save_strategy="no", logging_steps=1, disable_tqdm=True, seed=seed,
            use_cpu=True, dataloader_num_workers=0)
        trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                             value_model=value, train_dataset=train, eval_dataset=evald,
                             peft_config=peft_config)
        clock = _clock_callback()
        trainer.add_callback(clock)
        torch.manual_seed(seed)
        trainer.train()
    times = clock.step_times()
    return {"system": "trl", "step_s": times, "response_tokens_per_step": batch_size * response_length,
            "rss_at_step_gb": clock.rss_gb,
            "threads": torch.get_num_threads(), "mixed_precision": trainer.accelerator.mixed_precision,
            "matched": matched}


def _match_finegrain_bf16() -> None:
    """Give TRL's PPO the rest of finegrain's bf16 setting, for a comparison of the trainers alone.

    TRL's bf16 mode (``bf16=True`` through accelerate) autocasts only the prepared policy+value module's forward,
    i.e. the update; its generation and its reference, value and reward passes run in fp32. Here each of its
    rollout calls (``batch_generation``, ``forward``, ``get_reward`` of its PPO module) runs under bf16 autocast
    as finegrain's do, one autocast context per call, so cached bf16 weight copies never outlive a weight update;
    and the process keeps freed memory as finegrain's trainers do (``finegrain.speed.keep_freed_memory``,
    glibc's malloc thresholds). The models' attention kernel and bf16 frozen models are set by the caller.
    """
    import functools

    import torch
    from trl.experimental.ppo import ppo_trainer

    from finegrain.speed import keep_freed_memory

    def autocast(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(*args, **kwargs)
        return call

    for name in ("batch_generation", "forward", "get_reward"):
        setattr(ppo_trainer, name, autocast(getattr(ppo_trainer, name)))
    keep_freed_memory("cpu")


def run_rm(assets: Path, *, n_pairs: int, batch_size: int, max_length: int, seed: int,
           learning_rate: float) -> dict[str, Any]:
    """Train TRL's RewardTrainer for one epoch over ``n_pairs`` pairs; returns per-step wall times."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from finegrain.tokens import format_prompt

    tok = AutoTokenizer.from_pretrained(assets / "tokenizer")
    rows = read_jsonl(assets / "pairs.jsonl")[:n_pairs]
    # explicit-prompt format; TRL concatenates prompt + response and appends EOS, as finegrain does
    data = Dataset.from_dict({"prompt": [format_prompt(tok, r["prompt"]) for r in rows],
                              "chosen": [r["chosen"] for r in rows], "rejected": [r["rejected"] for r in rows]})
    model = AutoModelForSequenceClassification.from_pretrained(assets / "rm_seq", num_labels=1)
    with tempfile.TemporaryDirectory() as tmp:
        args = RewardConfig(output_dir=tmp, per_device_train_batch_size=batch_size, num_train_epochs=1,
                            learning_rate=learning_rate, max_length=max_length, report_to="none", bf16=False,
                            gradient_checkpointing=False, save_strategy="no", logging_steps=10**6,
                            disable_tqdm=True, seed=seed, use_cpu=True, dataloader_num_workers=0)
        trainer = RewardTrainer(model=model, args=args, processing_class=tok, train_dataset=data)
        clock = _clock_callback()
        trainer.add_callback(clock)
        trainer.train()
    return {"system": "trl", "step_s": clock.step_times(), "pairs_per_step": batch_size,
            "rss_at_step_gb": clock.rss_gb,
            "threads": torch.get_num_threads()}
