"""finegrain's side of the benchmarks: its own public functions on the shared assets.

Step times are read with the same kind of clock as TRL's side: a timestamp each time a step
ends. finegrain writes one ``metrics.jsonl`` line per finished step through
``finegrain.tracking.MetricsLog.log``; we wrap that method (instrumentation only: the wrapped
call still runs unchanged) and take the differences between successive timestamps.

For ``ppo_mfu`` the same hook can run a short matmul probe after each step, in the arm's own
precision (fp32 or bf16; its time is excluded from the step times), so the peak that divides the
update phase's FLOP/s is measured in the same process, seconds apart from the update it is
compared with.
"""
from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import matmul_params, matmul_peak, peak_rss_gb, train_flops_per_token


@dataclass
class Mark:
    """One finished step: when it was logged, its metrics, the probe's peak, when the next step began, peak RSS."""

    end: float
    metrics: dict
    peak: float | None
    resume: float
    rss_gb: float


@contextlib.contextmanager
def step_clock(probe_s: float = 0.0, probe_dtype: str = "fp32"):
    """Yield a list that receives a :class:`Mark` at every MetricsLog.log call (with a ``probe_dtype``
    matmul peak when ``probe_s`` > 0)."""
    from finegrain.tracking import MetricsLog

    marks: list[Mark] = []
    original = MetricsLog.log

    def log(self, metrics):
        original(self, metrics)
        end = time.perf_counter()
        # 1024 alone under-reads AMX's bf16 peak (about 1,450 against 2,400 GFLOP/s at 2048)
        peak = matmul_peak(probe_dtype, probe_s, sizes=(1024, 2048)) if probe_s > 0 else None
        marks.append(Mark(end, dict(metrics), peak, time.perf_counter(), peak_rss_gb()))

    MetricsLog.log = log
    try:
        yield marks
    finally:
        MetricsLog.log = original


def _diffs(t0: float, marks: list[Mark]) -> list[float]:
    """Step wall times: from the previous step's end (after any probe) to this step's end."""
    starts = [t0] + [m.resume for m in marks[:-1]]
    return [m.end - s for s, m in zip(starts, marks)]


def run_rm(assets: Path, *, n_pairs: int, batch_size: int, max_length: int, seed: int,
           learning_rate: float) -> dict[str, Any]:
    """finegrain train_reward_model, loss=sequence, one epoch over ``n_pairs`` preference pairs."""
    import torch

    from finegrain.rm import TrainRMConfig, train_reward_model
    from finegrain.config import build_config

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pairs.jsonl"
        lines = (assets / "pairs.jsonl").read_text().splitlines()[:n_pairs]
        data.write_text("\n".join(lines) + "\n")
        cfg = build_config(TrainRMConfig, dict(
            data=str(data), model=str(assets / "rm_seq"), output=str(Path(tmp) / "rm"), loss="sequence",
            pairs="preference", eval_fraction=0.0, epochs=1.0, batch_size=batch_size, lr=learning_rate,
            warmup_ratio=0.0, max_length=max_length, save_every=0, eval_every=0, seed=seed, log_with="none"))
        with step_clock() as marks:
            t0 = time.perf_counter()
            train_reward_model(cfg)
    # the clock starts before data preparation and model loading: drop step 1 (warm-up) in run.py
    return {"system": "finegrain", "step_s": _diffs(t0, marks), "pairs_per_step": batch_size,
            "rss_at_step_gb": [m.rss_gb for m in marks], "threads": torch.get_num_threads()}


def ppo_config_values(assets: Path, out: str, *, reward_mode: str, steps: int, batch_size: int,
                      response_length: int, ppo_epochs: int, num_minibatches: int, seed: int,
                      learning_rate: float, temperature: float, kl_coef: float,
                      policy: str = "policy") -> dict[str, Any]:
    """The PPOConfig fields that make finegrain do the same work as TRL's PPOTrainer setup."""
    rm = assets / ("rm_tok" if reward_mode == "token" else "rm_seq")
    return dict(
        policy=str(assets / policy), reward_model=str(rm), reward_mode=reward_mode,
        prompts=str(assets / "prompts.jsonl"), output=out, steps=steps, seed=seed, batch_size=batch_size,
        num_minibatches=num_minibatches, ppo_epochs=ppo_epochs, forward_batch_size=batch_size, lr=learning_rate,
        lr_schedule="linear", temperature=temperature, kl_coef=kl_coef, max_new_tokens=response_length,
        missing_eos_penalty=None, save_every=10**6, sample_every=0, log_with="none")


def run_ppo(assets: Path, *, reward_mode: str = "sequence", steps: int, batch_size: int, response_length: int,
            ppo_epochs: int, num_minibatches: int, seed: int, learning_rate: float, temperature: float,
            kl_coef: float, peak_probe_s: float = 0.0, peak_probe_dtype: str = "fp32", policy: str = "policy",
            speed: dict | None = None, **extra) -> dict[str, Any]:
    """finegrain train_ppo for ``steps`` steps; per-step wall times plus finegrain's own metrics.

    ``extra`` are further PPOConfig fields (``mixed_precision="bf16"``); ``speed`` sets
    ``finegrain.speed`` switches for the process (``{"frozen_low_precision": false}``: the code before
    that path, for a before/after in one run).
    """
    import torch

    from finegrain import speed as speed_switches
    from finegrain.config import build_config
    from finegrain.ppo import PPOConfig, train_ppo

    if speed:
        speed_switches.configure(**speed)

    with tempfile.TemporaryDirectory() as tmp:
        values = ppo_config_values(assets, str(Path(tmp) / "ppo"), reward_mode=reward_mode, steps=steps,
                                   batch_size=batch_size, response_length=response_length, ppo_epochs=ppo_epochs,
                                   num_minibatches=num_minibatches, seed=seed, learning_rate=learning_rate,
                                   temperature=temperature, kl_coef=kl_coef, policy=policy)
        values.update(extra)
        cfg = build_config(PPOConfig, values)
        with step_clock(peak_probe_s, peak_probe_dtype) as marks:
            t0 = time.perf_counter()
            train_ppo(cfg)
    metrics = [m.metrics for m in marks]
    return {"system": "finegrain", "reward_mode": reward_mode, "step_s": _diffs(t0, marks),
            "query_widths": query_widths(assets, cfg),
            "response_tokens_per_step": batch_size * response_length, "metrics": metrics,
            "peak_after_step": [m.peak for m in marks], "peak_dtype": peak_probe_dtype, "rss_at_step_gb": [m.rss_gb for m in marks],
            "threads": torch.get_num_threads()}


def build_ppo_engine(cfg, accelerator=None):
    """(engine, accelerator): finegrain's PPO engine built as ``train_ppo`` builds it, for stepping by hand.

    ``accelerator`` lets several engines share one (accelerate keeps one state per process).
    """
    from finegrain.ppo.setup import load_models, preflight
    from finegrain.ppo.train import build_engine, make_accelerator
    from finegrain.speed import keep_freed_memory

    run = preflight(cfg)
    if accelerator is None:
        accelerator = make_accelerator(cfg)
        keep_freed_memory(accelerator.device.type)  # as train_ppo does
    return build_engine(cfg, run, load_models(cfg, run, accelerator.device.type), accelerator), accelerator


def run_ppo_pair(assets: Path, *, steps: int, batch_size: int, response_length: int, ppo_epochs: int,
                 num_minibatches: int, seed: int, learning_rate: float, temperature: float, kl_coef: float,
                 **extra) -> dict[str, Any]:
    """token_vs_sequence_cost in ONE process: a sequence-reward and a token-reward PPO engine, stepped in turn.

    Both engines are built as ``finegrain ppo`` builds them (``preflight``, ``load_models``,
    ``build_engine``, one accelerator) and each PPO step (``run_step``: rollout, scoring,
    rewards, update) of one is followed by the same step of the other, the order alternating
    step by step. Separate processes of one system differ by up to 20 % on a VM; paired steps in
    one process share the process, its allocator and the moment, so their ratio is what the
    reward mode costs. Returns each mode's per-step seconds.
    """
    import torch

    from finegrain.config import build_config
    from finegrain.ppo import PPOConfig
    from finegrain.ppo.train import run_step

    engines, acc = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("sequence", "token"):
            values = ppo_config_values(assets, str(Path(tmp) / mode), reward_mode=mode, steps=steps,
                                       batch_size=batch_size, response_length=response_length, ppo_epochs=ppo_epochs,
                                       num_minibatches=num_minibatches, seed=seed, learning_rate=learning_rate,
                                       temperature=temperature, kl_coef=kl_coef)
            engines[mode], acc = build_ppo_engine(build_config(PPOConfig, values | extra), acc)
        step_s: dict[str, list[float]] = {mode: [] for mode in engines}
        for step in range(steps):
            order = list(engines) if step % 2 == 0 else list(engines)[::-1]
            for mode in order:
                t0 = time.perf_counter()
                run_step(engines[mode], step, None)
                step_s[mode].append(time.perf_counter() - t0)
    return {"system": "finegrain", "step_s": step_s, "response_tokens_per_step": batch_size * response_length,
            "threads": torch.get_num_threads()}


def query_widths(assets: Path, cfg) -> list[int]:
    """Padded prompt width of every step (finegrain's prompt order is a pure function of the step)."""
    from finegrain.tokens import encode_prompts, format_prompt
    from finegrain.models import load_tokenizer
    from finegrain.ppo.setup import load_prompts
    from finegrain.ppo.train import batch_indices

    tok = load_tokenizer(cfg.policy)
    ids = encode_prompts(tok, [format_prompt(tok, p, cfg.prompt_template) for p in load_prompts(cfg)])
    return [max(len(ids[i]) for i in batch_indices(len(ids), s, cfg.batch_size, 0, 1, cfg.seed))
            for s in range(cfg.steps)]


def run_peak(assets: Path, *, seconds: float = 1.5) -> dict[str, Any]:
    """Matmul peaks (fp32, bf16) and the FLOP model of the benchmark policy and value model."""
    import transformers

    policy = transformers.AutoModelForCausalLM.from_pretrained(assets / "policy")
    value = transformers.AutoModelForTokenClassification.from_pretrained(assets / "rm_tok", num_labels=1)
    c = policy.config
    return {"fp32_flops": matmul_peak("fp32", seconds), "bf16_flops": matmul_peak("bf16", seconds),
            "policy_matmul_params": matmul_params(policy), "value_matmul_params": matmul_params(value),
            "lm_head_params": policy.get_output_embeddings().weight.numel(),
            "n_layer": c.n_layer, "n_embd": c.n_embd,
            "example_flops_per_token_L64": train_flops_per_token(matmul_params(policy), c.n_layer, c.n_embd, 64)}
