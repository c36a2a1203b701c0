"""The PPO loop: rollout -> rewards -> GAE -> several epochs of clipped updates, with checkpoints.

``train_ppo(cfg)`` is what ``finegrain ppo`` runs; it works unchanged under ``accelerate launch``
(DDP, FSDP, DeepSpeed): each process generates ``batch_size`` rollouts per step, gradients are
synchronised by accelerate, and only the main process writes metrics, samples and checkpoints.

Output directory::

    config.json            the full resolved config (written at the start)
    metrics.jsonl          one JSON object per step (see :func:`step_metrics`)
    samples.jsonl          sample generations every --sample-every steps and at the last
    checkpoints/step-N/    resumable checkpoints, the format of every trainer (:mod:`finegrain.training`):
                           weights (policy and value model), optimizer, RNG, state.json with the step,
                           the prompts' fingerprint, KL controller and reward statistics
    final/                 the trained policy (save_pretrained + finegrain.json; LoRA merged)
    final_adapter/         the LoRA adapters alone (with --use-lora)
    value/                 the trained value model (with --value-init shared: value_head.safetensors, the head
                           on final/'s last hidden state)
    <tracker dirs>         TensorBoard event files
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch

from ..config import to_dict
from ..errors import ConfigError, InputError
from ..generation import sample, stop_token_ids
from ..io import write_json
from ..tracking import MetricsLog, init_trackers, progress, resolve_log_with
from ..speed import keep_freed_memory, lower_frozen_weights, options as speed_options, reuses_rollout_forward
from ..training import (MasterWeightAdamW, check_finite, checkpoint_dirs, clip_gradients, fingerprint,
                        hold_parameters_in, make_adamw, master_weights, refuse_stale_checkpoints,
                        refuse_changed_options, resume_training_state, save_training_state,
                        torch_seed)
from . import core
from .config import PPOConfig
from .rewards import RewardScorer
from .rollout import (AttachedForward, PolicyAndValue, RewardSettings, Rollout, ValueHead, attached_forward,
                      causal_logits, forward_response, make_rollout, process_rewards, reward_statistic, rollout_stats,
                      sample_records, score_rollout_forward, unwrapped_for_generation)
from .setup import LoadedModels, RunInputs, load_models, lora_on_loaded_base, preflight

log = logging.getLogger("finegrain.ppo")
OnRollout = Callable[[int, list, list], dict]


# ----------------------------------------------------------------------------- data order
def batch_indices(n_prompts: int, step: int, batch_size: int, rank: int, world: int, seed: int) -> list[int]:
    """Prompt indices of process ``rank`` at ``step`` (0-based): a seeded permutation per epoch.

    The global stream of prompts is perm(epoch 0) + perm(epoch 1) + ...; step s takes positions
    [s*G, (s+1)*G) with G = batch_size * world, and each rank its own slice. A pure function of
    the step, so a resumed run reads exactly the prompts it would have read.
    """
    start = step * batch_size * world + rank * batch_size
    out = []
    for pos in range(start, start + batch_size):
        epoch, i = divmod(pos, n_prompts)
        g = torch.Generator().manual_seed(torch_seed(seed * 1_000_003 + epoch))
        out.append(int(torch.randperm(n_prompts, generator=g)[i]))
    return out


def lr_factor(cfg: PPOConfig, step: int) -> float:
    """Learning-rate multiplier at ``step`` (0-based): linear decay to 0 over the run, or 1."""
    return 1.0 - step / cfg.steps if cfg.lr_schedule == "linear" else 1.0


# ----------------------------------------------------------------------------- update
def ppo_minibatch_loss(model, b: Rollout, cfg: PPOConfig,
                       attached: AttachedForward | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped policy loss + vf_coef * clipped value loss of one micro-batch, and its statistics.

    With ``attached`` (the first minibatch, the whole batch), its log-probs and values are the
    forward's (taken from it: :meth:`AttachedForward.take`); otherwise the model runs on the micro-batch.
    """
    if attached is not None:
        logprobs, values = attached.take()
    else:
        logprobs, values, _ = forward_response(model, b.query_ids, b.query_mask, b.response_ids, b.response_mask,
                                               cfg.temperature, with_entropy=False)
    mask = b.response_mask.float()
    pl = core.policy_loss(logprobs, b.logprobs, b.advantages, mask, cfg.cliprange)
    vl, vclip = core.value_loss(values, b.values, b.returns, mask, cfg.cliprange_value)
    loss = pl.loss + cfg.vf_coef * vl
    stats = {"policy_loss": pl.loss.item(), "value_loss": vl.item(), "clipfrac": pl.clipfrac.item(),
             "approx_kl": pl.approx_kl.item(), "value_clipfrac": vclip.item(), "loss": loss.item()}
    return loss, stats


def ppo_update(accelerator, model, optimizer, rollout: Rollout, cfg: PPOConfig, step: int,
               attached: AttachedForward | None = None) -> dict[str, float]:
    """``ppo_epochs`` passes over the rollouts in shuffled minibatches; one optimizer step per minibatch.

    Each minibatch is split into ``grad_accum`` micro-batches whose gradients accelerate
    accumulates (and synchronises across processes once per minibatch). Each micro-batch's loss
    (a token mean) is weighted by its share of the minibatch's response tokens, so the accumulated
    gradient is the whole minibatch's token mean whatever the responses' lengths. Returned statistics
    are averaged over ALL micro-batches of all epochs, not the last one. ``attached``, the
    rollout's forward that :func:`rollout_step` returns when it is reused
    (:func:`finegrain.speed.reuses_rollout_forward`), is spent on the first minibatch, the whole
    batch in the rollout's row order (one minibatch: the order changes nothing), and dropped.
    """
    n = len(rollout.prompts)
    mb = cfg.minibatch_size()
    micro = mb // cfg.grad_accum
    g = torch.Generator().manual_seed(torch_seed(cfg.seed * 7919 + step))
    for group, base in zip(optimizer.param_groups, (cfg.lr, cfg.value_learning_rate())):
        group["lr"] = base * lr_factor(cfg, step)
    sums: dict[str, float] = defaultdict(float)
    count = 0
    trim = speed_options().trim_minibatches
    if attached is not None and micro < n:
        raise ValueError("an attached forward covers the whole batch; the minibatch here is smaller")
    tokens = rollout.response_mask.sum(-1).float()  # (B,) real response tokens of each rollout
    for epoch in range(cfg.ppo_epochs):
        perm = torch.randperm(n, generator=g)
        for start in range(0, n, micro):
            if attached is not None:  # the first minibatch: the rows the forward ran on
                b = rollout.select(torch.arange(n), accelerator.device, trim=False)
            else:
                b = rollout.select(perm[start:start + micro], accelerator.device, trim=trim)
            with accelerator.accumulate(model):
                loss, stats = ppo_minibatch_loss(model, b, cfg, attached)
                attached = None  # spent (taken): its graph lives only as long as this loss
                if cfg.grad_accum > 1:  # accelerate divides by grad_accum: x grad_accum x this micro-batch's share
                    first = start - start % mb
                    share = tokens[perm[start:start + micro]].sum() / tokens[perm[first:first + mb]].sum().clamp(min=1)
                    loss = loss * (cfg.grad_accum * share.item())
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm is not None:
                    clip_gradients(accelerator, model, optimizer, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            for k, v in stats.items():
                sums[k] += v
            count += 1
    out = {k: v / count for k, v in sums.items()}
    out["lr"] = cfg.lr * lr_factor(cfg, step)
    return out


# ----------------------------------------------------------------------------- checkpoints
# what a resumed run may change: where things are and go (the prompts are checked by their fingerprint), how
# often it saves, samples and logs, and the speed switches; every other option decides the steps it continues
_FREE_ON_RESUME = frozenset({"policy", "reward_model", "sequence_reward_model", "prompts", "output", "prompt_field",
                             "prompt_template", "resume", "save_every", "keep_checkpoints", "sample_every",
                             "num_samples", "log_with", "forward_batch_size", "attn_implementation",
                             "trust_remote_code"})


def resumed_options(cfg: PPOConfig, processes: int) -> dict:
    """The options a resume must repeat (checked against a checkpoint's by
    :func:`finegrain.training.refuse_changed_options`): all but :data:`_FREE_ON_RESUME`, and ``--steps`` only
    under the linear learning-rate schedule (which decays over them; a constant rate lets a run be extended)."""
    free = _FREE_ON_RESUME | ({"steps"} if cfg.lr_schedule != "linear" else set())
    # a second RM's directory may move like the first's, but a run must keep or lack it (and its statistics)
    return {"processes": processes, **{k: v for k, v in to_dict(cfg).items() if k not in free},
            "sequence_reward_model": cfg.sequence_reward_model is not None}


RESUME_HINTS = {"steps": "a run made with --lr-schedule constant can be resumed with more --steps; this one "
                         "decays its rate over the --steps it was started with"}
"""What a refused resume adds about an option (:func:`finegrain.training.refuse_changed_options`)."""


def running_state(e: Engine, steps_done: int) -> dict:
    """What a checkpoint's state.json keeps of the run besides weights, optimizer and RNG
    (:func:`finegrain.training.save_training_state`)."""
    return {"data_position": steps_done * e.cfg.batch_size * e.accelerator.num_processes,
            "kl_controller": e.kl_ctl.state_dict(),
            "reward_moments": e.moments.state_dict() if e.moments is not None else None,
            "sequence_moments": e.sequence_moments.state_dict() if e.sequence_moments is not None else None}


def restore_running_state(e: Engine, state: dict) -> None:
    """Take :func:`running_state` back from a checkpoint's state.json (an InputError when it cannot)."""
    try:
        e.kl_ctl.load_state_dict(state["kl_controller"])
        if e.moments is not None and state.get("reward_moments"):
            e.moments.load_state_dict(state["reward_moments"])
        if e.sequence_moments is not None:  # (a run with --sequence-reward-model saves them from its first checkpoint)
            e.sequence_moments.load_state_dict(state["sequence_moments"])
    except (KeyError, TypeError, ValueError) as err:
        what = f"{type(err).__name__}: {err}"
        raise InputError(f"holds no valid KL-controller or reward statistics ({what})") from err


# ----------------------------------------------------------------------------- final weights
def _is_sharded(accelerator) -> bool:
    """FSDP or DeepSpeed ZeRO-3: no process holds the full weights in its modules."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return getattr(accelerator.state, "fsdp_plugin", None) is not None or (plugin is not None
                                                                        and plugin.zero_stage == 3)


def _full_copies(accelerator, model):
    """(policy, value model or shared backbone's value head) holding full weights, on the main process (None elsewhere).

    Unsharded runs return the modules themselves; FSDP / ZeRO-3 gather the state dict
    (``accelerator.get_state_dict``, every process must call it) into fresh CPU copies.
    """
    unwrapped = accelerator.unwrap_model(model)
    if not _is_sharded(accelerator):
        value = unwrapped.value_head if unwrapped.value_head is not None else unwrapped.value_model
        return (unwrapped.policy, value) if accelerator.is_main_process else (None, None)
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    full = accelerator.get_state_dict(model)  # gathered on the main process
    if not accelerator.is_main_process:
        return None, None
    peft_cfg = getattr(unwrapped.policy, "peft_config", None)
    base_cfg = unwrapped.policy.get_base_model().config if peft_cfg else unwrapped.policy.config
    policy = AutoModelForCausalLM.from_config(base_cfg)
    if peft_cfg:
        from peft import get_peft_model

        policy = get_peft_model(policy, peft_cfg["default"])
    if unwrapped.value_head is not None:
        value_model, value_prefix = ValueHead(unwrapped.value_head.linear.in_features), "value_head."
    else:
        value_model = AutoModelForTokenClassification.from_config(unwrapped.value_model.config)
        value_prefix = "value_model."
    for prefix, module in (("policy.", policy), (value_prefix, value_model)):
        module.load_state_dict({k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)})
    return policy, value_model


def save_final(accelerator, model, run: RunInputs, cfg: PPOConfig, summary: dict,
               lora_base_lowered: bool = False) -> None:
    """final/ (policy, LoRA merged), final_adapter/ (LoRA only) and value/, loadable by plain transformers.

    ``lora_base_lowered``: the live LoRA base was stored in bf16/fp16 for autocast, so the adapters
    are merged into a freshly loaded base instead (:func:`~finegrain.ppo.setup.lora_on_loaded_base`).
    """
    from ..models import save_checkpoint

    accelerator.wait_for_everyone()
    policy, value_model = _full_copies(accelerator, model)
    if not accelerator.is_main_process:
        return
    out = Path(cfg.output)
    meta = {"kind": "policy", "stage": "ppo", "reward_mode": cfg.reward_mode, "reward_model": cfg.reward_model,
            "base_policy": cfg.policy, "steps": summary["steps"], "lora": cfg.use_lora, "config": to_dict(cfg)}
    if cfg.use_lora:
        save_checkpoint(out / "final_adapter", policy, run.tokenizer, dict(meta, kind="lora_adapter"))
        if lora_base_lowered:
            policy = lora_on_loaded_base(policy, cfg, run)
        policy = policy.merge_and_unload()
        meta["lora_merged"] = True
    save_checkpoint(out / "final", policy, run.tokenizer, meta)
    if isinstance(value_model, ValueHead):  # the shared backbone's head: it reads final/'s last hidden state
        save_checkpoint(out / "value", value_model, None, {"kind": "value_head", "stage": "ppo", "value_init": "shared",
                                                          "backbone": "final", "file": ValueHead.FILE})
    else:
        save_checkpoint(out / "value", value_model, run.tokenizer,
                        {"kind": "value", "stage": "ppo", "value_init": cfg.value_init})


# ----------------------------------------------------------------------------- one step
@dataclasses.dataclass
class Engine:
    """Everything a step needs, prepared once (no config bag: each piece is explicit)."""

    cfg: PPOConfig
    run: RunInputs
    accelerator: object
    model: object                  # prepared PolicyAndValue
    optimizer: object
    ref_policy: object | None
    scorer: RewardScorer
    kl_ctl: core.FixedKLController
    moments: core.RunningMoments | None
    settings: RewardSettings
    lora_base_lowered: bool = False  # the LoRA policy's frozen base layers are stored in the autocast dtype
    sequence_scorer: RewardScorer | None = None   # --sequence-reward-model
    sequence_moments: core.RunningMoments | None = None  # its scores' running mean and std


def reduce_mean(accelerator, stats: dict[str, float]) -> dict[str, float]:
    """Mean of each statistic over processes (identical keys on every process)."""
    if accelerator.num_processes == 1:
        return stats
    keys = sorted(stats)
    t = torch.tensor([float(stats[k]) for k in keys], device=accelerator.device)
    t = accelerator.reduce(t, reduction="mean")
    return dict(zip(keys, t.tolist()))


def rollout_step(e: Engine, step: int) -> tuple[Rollout, dict[str, float], AttachedForward | None]:
    """Generate, score and assemble one step's rollouts (0-based ``step``).

    Returns the rollouts (plain detached data), the timings, and the rollout's policy and value
    forward still in autograd when the update reuses it (:func:`finegrain.speed.reuses_rollout_forward`;
    else None): pass it to :func:`ppo_update` with these rollouts.
    """
    cfg, acc = e.cfg, e.accelerator
    idx = batch_indices(len(e.run.prompts), step, cfg.batch_size, acc.process_index, acc.num_processes, cfg.seed)
    prompts = [e.run.prompts[i] for i in idx]
    queries = [e.run.query_ids[i] for i in idx]
    reuse = reuses_rollout_forward(cfg)
    t0 = time.perf_counter()
    with unwrapped_for_generation(acc, e.model) as unwrapped:
        with acc.autocast():
            gen = sample(unwrapped.policy, e.run.tokenizer, queries, max_new_tokens=cfg.max_new_tokens,
                         temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                         generator_seed=torch_seed(cfg.seed * 1_000_003 + step * acc.num_processes
                                                    + acc.process_index))
        t1 = time.perf_counter()
        lora = unwrapped.policy if cfg.use_lora else None
        with acc.autocast():
            fwd = score_rollout_forward(None if reuse else unwrapped, e.ref_policy, lora, gen.query_ids,
                                        gen.query_mask, gen.response_ids, gen.response_mask, cfg.temperature,
                                        cfg.forward_batch_size, acc.device)
    attached = None
    with acc.autocast():
        if reuse:  # through the prepared model (DDP/FSDP/DeepSpeed), with autograd: the first epoch's forward
            attached, own = attached_forward(e.model, gen.query_ids, gen.query_mask, gen.response_ids,
                                             gen.response_mask, cfg.temperature, acc.device)
            fwd.update(own)
        rm = e.scorer.score(prompts, queries, gen.response_ids, gen.response_mask, gen.texts)
        seq = None
        if e.sequence_scorer is not None:
            seq = e.sequence_scorer.response_scores(prompts, queries, gen.response_ids, gen.response_mask, gen.texts)
    if e.moments is not None:  # running statistics over every process's rewards
        e.moments.update(acc.gather(reward_statistic(rm, e.settings).to(acc.device)).cpu())
    whole = None
    if seq is not None:
        e.sequence_moments.update(acc.gather(seq.to(acc.device)).cpu())
        whole = cfg.sequence_reward_coef * e.sequence_moments.normalise(seq)
    r = process_rewards(make_rollout(prompts, queries, gen, fwd, rm, seq), rm, e.kl_ctl.value, e.settings, e.moments,
                        whole)
    t2 = time.perf_counter()
    return r.tensors_out_of_inference_mode(), {"time_generate": t1 - t0, "time_score": t2 - t1}, attached


def run_step(e: Engine, step: int, on_rollout: OnRollout | None) -> tuple[dict[str, float], Rollout]:
    """One PPO step (0-based): rollouts, update, KL controller; returns the metrics line (1-based step)."""
    t0 = time.perf_counter()
    r, times, attached = rollout_step(e, step)
    stats = rollout_stats(r)
    stats["kl_coef"] = e.kl_ctl.value
    if on_rollout is not None:
        extra = on_rollout(step + 1, list(r.prompts), list(r.texts)) or {}
        if not isinstance(extra, dict):
            raise ConfigError("on_rollout must return a dict of metric name -> number")
        stats.update({k: float(v) for k, v in extra.items()})
    t1 = time.perf_counter()
    stats.update(ppo_update(e.accelerator, e.model, e.optimizer, r, e.cfg, step, attached))
    times["time_update"] = time.perf_counter() - t1
    stats.update(times)
    n_tokens = float(r.response_mask.sum())
    stats["response_tokens"] = n_tokens
    stats = reduce_mean(e.accelerator, stats)
    stats["response_tokens"] *= e.accelerator.num_processes
    stats["tokens_per_s"] = stats["response_tokens"] / max(time.perf_counter() - t0, 1e-9)
    e.kl_ctl.update(stats["kl"], len(r.prompts) * e.accelerator.num_processes)
    return {"step": step + 1, **stats}, r


# ----------------------------------------------------------------------------- the run
def make_accelerator(cfg: PPOConfig):
    from accelerate import Accelerator

    log_with = resolve_log_with(cfg.log_with)
    acc = Accelerator(gradient_accumulation_steps=cfg.grad_accum, log_with=log_with or None, project_dir=cfg.output,
                      mixed_precision=cfg.mixed_precision)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and acc.num_processes == 1:  # every process would think it is rank 0 and clobber the outputs
        raise ConfigError(f"launched as {world} processes but accelerate sees 1 (no GPU found?); for several CPU "
                          "processes set ACCELERATE_USE_CPU=true (see examples/accelerate/README.md)")
    return acc


def last_hidden_size(policy) -> int:
    """The width of the hidden state a shared value head reads, from a one-token forward: the config's
    ``hidden_size`` is not always it (OPT-350m projects its last hidden state down to 512 of 1,024)."""
    device = next(policy.parameters()).device
    one = torch.zeros((1, 1), dtype=torch.long, device=device)
    with torch.no_grad():
        _, hidden = causal_logits(policy, one, torch.ones_like(one), one, 1, with_hidden=True)
    return int(hidden.shape[-1])


def build_engine(cfg: PPOConfig, run: RunInputs, models: LoadedModels, accelerator) -> Engine:
    """Wrap, prepare and connect the models; the optimizer has one group for the policy, one for the value."""
    sharded = accelerator.distributed_type.value in ("DEEPSPEED", "FSDP", "MEGATRON_LM", "XLA")
    if cfg.param_dtype == "bf16":  # every model held in bf16; the optimizer steps fp32 masters of the trained weights
        if sharded:
            raise ConfigError(f"--param-dtype bf16 is not for {accelerator.distributed_type.value}, which keeps fp32 "
                              "master weights of its own: use its mixed precision (FSDP's param_dtype, DeepSpeed's "
                              "bf16) with --param-dtype fp32")
        for m in (models.policy, models.value_model, models.ref_policy, models.reward_model,
                  models.sequence_reward_model):
            if m is not None:
                hold_parameters_in(m, torch.bfloat16)
        lora_lowered = cfg.use_lora
    else:
        held = next(p.dtype for p in models.policy.parameters() if p.requires_grad)  # (--dtype auto: as saved)
        if held != torch.float32 and not sharded:  # (FSDP and DeepSpeed keep fp32 masters of their own)
            name = str(held).removeprefix("torch.")
            log.warning("--dtype %s: AdamW steps the %s weights themselves, and an update below half a step of that "
                        "dtype is rounded away (at PPO's usual rates nearly every update); --param-dtype bf16 with "
                        "--mixed-precision bf16 holds bf16 weights with fp32 master copies", cfg.dtype, name)
        # frozen weights in the autocast dtype (speed.lower_frozen_weights); a sharded (FSDP/DeepSpeed) policy
        # keeps one dtype, its engine casts for itself
        low = accelerator.mixed_precision
        for frozen in (models.ref_policy, models.reward_model, models.sequence_reward_model):
            if frozen is not None:
                lower_frozen_weights(frozen, low)
        lora_lowered = cfg.use_lora and not sharded and lower_frozen_weights(models.policy, low) > 0
    head = None
    if models.value_model is None:  # --value-init shared: a head on the policy, in its trainable weights' dtype
        dtype = next(p.dtype for p in models.policy.parameters() if p.requires_grad)
        head = ValueHead(last_hidden_size(models.policy), dtype=dtype)
    model = PolicyAndValue(models.policy, models.value_model, head)
    value_params = (head if head is not None else models.value_model).parameters()
    groups = [{"params": [p for p in models.policy.parameters() if p.requires_grad], "lr": cfg.lr},
              {"params": [p for p in value_params if p.requires_grad], "lr": cfg.value_learning_rate()}]
    if cfg.param_dtype == "bf16":  # the masters copy the weights once DDP has broadcast rank 0's (a fresh head's)
        model = accelerator.prepare(model)
        optimizer = accelerator.prepare(MasterWeightAdamW(groups, eps=cfg.adam_eps))
    else:
        optimizer = make_adamw(groups, eps=cfg.adam_eps)
        plugin = getattr(accelerator.state, "deepspeed_plugin", None)
        if plugin is not None:  # no dataloader is prepared, so DeepSpeed must be told the micro-batch size
            plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.minibatch_size() // cfg.grad_accum
        model, optimizer = accelerator.prepare(model, optimizer)
    ref = models.ref_policy.to(accelerator.device) if models.ref_policy is not None else None
    stop_ids = stop_token_ids(run.tokenizer, models.policy)
    scorer = RewardScorer(models.reward_model.to(accelerator.device), run.rm_tokenizer, run.rm_kind, run.tokenizer,
                          max_length=run.rm_max_length, template=cfg.prompt_template,
                          batch_size=cfg.forward_batch_size, view=run.rm_view, stop_ids=stop_ids)
    seq_scorer = None
    if models.sequence_reward_model is not None:
        srm = run.sequence_rm
        seq_scorer = RewardScorer(models.sequence_reward_model.to(accelerator.device), srm.tokenizer, srm.kind,
                                  run.tokenizer, max_length=srm.max_length, template=cfg.prompt_template,
                                  batch_size=cfg.forward_batch_size, view=srm.view, stop_ids=stop_ids)
    kl_ctl = (core.AdaptiveKLController(cfg.initial_kl_coef(), cfg.target_kl, cfg.kl_horizon) if cfg.adaptive_kl
              else core.FixedKLController(cfg.initial_kl_coef()))
    settings = RewardSettings(cfg.reward_mode, cfg.kl_estimator, cfg.token_reward_scale, cfg.reward_clip,
                              cfg.missing_eos_penalty, cfg.whiten_rewards, cfg.gamma, cfg.lam, cfg.whiten_advantages)
    return Engine(cfg, run, accelerator, model, optimizer, ref, scorer, kl_ctl,
                  core.RunningMoments() if cfg.reward_norm else None, settings, lora_lowered, seq_scorer,
                  core.RunningMoments() if seq_scorer is not None else None)


def train_ppo(cfg: PPOConfig, *, on_rollout: OnRollout | None = None, accelerator=None,
              models: LoadedModels | None = None) -> dict:
    """Run PPO as configured; returns a summary (steps, final reward and KL, output paths).

    on_rollout(step, prompts, responses) -> {name: number} is called on every process after each
    step's generation; its numbers join that step's metrics line (averaged over processes), e.g.
    a gold reward in the sandbox. ``accelerator`` and ``models`` (a :class:`LoadedModels`) may be
    passed in; by default both are built from ``cfg`` alone.
    """
    run = preflight(cfg)  # refuses bad input before any weights load
    out = Path(cfg.output)
    refuse_stale_checkpoints(out, cfg.resume, checkpoint_dirs(out))
    acc = accelerator or make_accelerator(cfg)
    if acc.gradient_accumulation_steps != cfg.grad_accum:  # it decides when the optimizer steps
        raise ConfigError(f"the accelerator passed in accumulates {acc.gradient_accumulation_steps} micro-batches per "
                          f"optimizer step, --grad-accum {cfg.grad_accum}: build it with make_accelerator(cfg)")
    keep_freed_memory(acc.device.type)
    from accelerate.utils import set_seed

    set_seed(cfg.seed % 2 ** 32)  # (NumPy's seed is 32 bits)
    e = build_engine(cfg, run, models or load_models(cfg, run, acc.device.type), acc)
    prompts = {"data_fingerprint": fingerprint(" ".join(map(str, q)) for q in run.query_ids)}
    state, options = None, resumed_options(cfg, acc.num_processes)
    if cfg.resume:
        state = resume_training_state(out, acc, expect=prompts, restore=lambda saved: restore_running_state(e, saved),
                                      differs="the prompts differ from that run's (same --prompts, "
                                              "--prompt-field, --prompt-template and policy tokenizer needed)")
        if state is not None:
            refuse_changed_options(state.get("options"), options, checkpoint_dirs(out)[-1], RESUME_HINTS)
    start = state["step"] if state is not None else 0
    main = acc.is_main_process
    resume_at = start + 1 if cfg.resume else None
    metrics = MetricsLog(out / "metrics.jsonl", resume_from_step=resume_at, enabled=main)
    samples = MetricsLog(out / "samples.jsonl", resume_from_step=resume_at, enabled=main)
    if main:
        write_json(out / "config.json", to_dict(cfg))
        log.info("PPO config: %s", to_dict(cfg))
    init_trackers(acc, "ppo", to_dict(cfg), first_step=start + 1)
    bar = progress(total=cfg.steps, initial=start, desc=f"ppo ({cfg.reward_mode} rewards)", disable=None if main else True)
    line: dict = {}
    for step in range(start, cfg.steps):
        line, r = run_step(e, step, on_rollout)
        check_finite(step + 1, line, ("reward", "loss"))
        metrics.log(line)
        acc.log({k: v for k, v in line.items() if k != "step"}, step=step + 1)
        # and at the last step, so that a run shorter than --sample-every has samples too
        if cfg.sample_every and ((step + 1) % cfg.sample_every == 0 or step + 1 == cfg.steps):
            for row in sample_records(step + 1, r, cfg.num_samples):
                samples.log(row)
        bar.set_postfix(reward=f"{line['reward']:.3f}", kl=f"{line['kl']:.3f}", refresh=False)  # drawn by update(),
        bar.update(1)                                                                      # at most once a second
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            save_training_state(out, step + 1, acc, dict(prompts, options=options, **running_state(e, step + 1)),
                                keep=cfg.keep_checkpoints)
    bar.close()
    if not line and main:  # resumed at the last step: nothing ran, report the last logged line
        line = (metrics.read() or [{}])[-1]
    summary = {"steps": cfg.steps, "resumed_from": start if cfg.resume else None, "output": str(out),
               "final_policy": str(out / "final"), "metrics": str(out / "metrics.jsonl"),
               "last": {k: line.get(k) for k in ("reward", "kl", "tokens_per_s")}}
    masters = master_weights(e.optimizer)
    if masters is not None:  # --param-dtype bf16: the final weights are the fp32 masters
        masters.restore_fp32()
    save_final(acc, e.model, run, cfg, summary, e.lora_base_lowered)
    acc.end_training()
    return summary
