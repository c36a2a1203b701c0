"""Rollouts: generate -> log-probs, reference log-probs, values -> RM scores -> per-token rewards -> GAE.

Stages pass one documented dataclass, :class:`Rollout`: plain detached data. Everything before
the update runs under ``torch.inference_mode``; the finished rollout is cloned out of it so the
update can use its tensors in autograd. The one forward that keeps its graph for the update
(:func:`attached_forward`) hands it to the trainer beside the rollout, never inside it.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .. import speed
from . import core
from .rewards import RewardOutput


class ValueHead(nn.Module):
    """The value head of a shared backbone: V(s_t) = w . h_t + b on the policy's last hidden state h_t.

    Zero-initialised, so every value starts at 0 and, until the head has learnt something, the
    value loss sends no gradient into the policy's backbone (its gradient there is the head's
    weight). Saved as ``value_head.safetensors`` (:meth:`save_pretrained`), read back with
    :func:`load_value_head`.
    """

    FILE = "value_head.safetensors"

    def __init__(self, hidden_size: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1, dtype=dtype)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, L, hidden) -> (B, L)."""
        return self.linear(hidden)[..., 0]

    def save_pretrained(self, out_dir, safe_serialization: bool = True) -> None:
        """``out_dir/value_head.safetensors``; the signature is transformers' (what ``save_checkpoint``
        calls), but a head is only ever written as safetensors."""
        from safetensors.torch import save_file

        if not safe_serialization:
            raise ValueError("a value head is saved as safetensors only (safe_serialization=False asked for pickle)")

        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                  str(Path(out_dir) / self.FILE))


def load_value_head(model_dir) -> ValueHead:
    """A :class:`ValueHead` from ``model_dir/value_head.safetensors`` (what PPO with ``--value-init shared`` saves)."""
    from safetensors.torch import load_file

    state = load_file(str(Path(model_dir) / ValueHead.FILE))
    weight = state["linear.weight"]
    head = ValueHead(weight.shape[1], dtype=weight.dtype)
    head.load_state_dict(state)
    return head


class PolicyAndValue(nn.Module):
    """Policy (causal LM, maybe a peft model) and value model (token classification, one label) as ONE module.

    One module means one ``accelerator.prepare``, one optimizer (two parameter groups) and one
    gradient synchronisation, which is what DDP, FSDP and DeepSpeed all expect.

    With ``value_model`` None the backbone is shared (``--value-init shared``): the values come
    from a :class:`ValueHead` on the policy's own last hidden state, in the policy's forward, so
    one forward and one backward serve both. That changes the algorithm, not only its cost: the
    value loss (x ``vf_coef``) trains the policy's backbone too.
    """

    def __init__(self, policy: nn.Module, value_model: nn.Module | None, value_head: ValueHead | None = None):
        super().__init__()
        if (value_model is None) == (value_head is None):
            raise ValueError("PolicyAndValue takes a value model or a value head on a shared backbone, not both")
        self.policy, self.value_model, self.value_head = policy, value_model, value_head

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep: int = 0):
        """(logits of the last ``logits_to_keep`` positions, or all when 0) (B, K, V), values (B, L)."""
        if self.value_head is not None:
            logits, hidden = causal_logits(self.policy, input_ids, attention_mask, position_ids, logits_to_keep,
                                           with_hidden=True)
            return logits, self.value_head(hidden)
        logits = causal_logits(self.policy, input_ids, attention_mask, position_ids, logits_to_keep)
        values = self.value_model(input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids).logits[..., 0]
        return logits, values


def causal_logits(policy: nn.Module, ids, mask, pos, keep: int = 0, with_hidden: bool = False):
    """Logits (B, keep, V) of the last ``keep`` positions (all when 0); with ``with_hidden`` also the
    last hidden state (B, L, hidden), the one the LM head reads (after the final norm).

    The LM head and everything after it (log-softmax, its backward) run only where log-probs are
    needed: the response, not the prompt. With a 20-token prompt and a 32-token response that
    skips 37 % of the LM head; with a long prompt and a large vocabulary, most of it (and of the
    biggest activation of a PPO step, the (B, L, V) logits). Speed switch ``logits_to_keep``
    (:func:`finegrain.speed.keeps_logits`); off, or for a model without it, the LM head runs on
    every position and the logits are cut after it.
    """
    extra = {"output_hidden_states": True} if with_hidden else {}
    if keep and speed.keeps_logits(policy):
        out = policy(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep, **extra)
    else:
        out = policy(input_ids=ids, attention_mask=mask, position_ids=pos, **extra)
    logits = out.logits[:, -keep:] if keep else out.logits
    return (logits, out.hidden_states[-1]) if with_hidden else logits


def join_query_response(q_ids, q_mask, r_ids, r_mask):
    """Left-padded query + right-padded response -> ids, mask, position ids, all (B, Lq + Lr)."""
    ids = torch.cat([q_ids, r_ids], dim=1)
    mask = torch.cat([q_mask, r_mask], dim=1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


def response_logits(logits: torch.Tensor, response_len: int, temperature: float) -> torch.Tensor:
    """Logits predicting each response token, divided by the sampling temperature: (B, K, V) -> (B, Lr, V).

    ``logits`` covers at least the last ``response_len + 1`` positions: the one before each
    response token predicts it, and the last position predicts nothing. At temperature 1 the
    division (a pass over (B, Lr, V) forward and backward) is skipped.
    """
    logits = logits[:, -response_len - 1:-1]
    return logits if temperature == 1.0 else logits / temperature


def forward_response(model: nn.Module, q_ids, q_mask, r_ids, r_mask, temperature: float, with_entropy: bool = True):
    """(logprobs, values, entropy or None), each (B, Lr), of the response tokens under a :class:`PolicyAndValue`.

    The value of response position t is the value head's output at the token before it (state s_t).
    The entropy is a statistic, outside autograd (no loss uses it).
    """
    ids, mask, pos = join_query_response(q_ids, q_mask, r_ids, r_mask)
    lr = r_ids.shape[1]
    logits, values = model(ids, mask, pos, logits_to_keep=lr + 1)
    logits = response_logits(logits, lr, temperature)
    entropy = core.entropy_from_logits(logits.detach()) if with_entropy else None
    return core.logprobs_from_logits(logits, r_ids), values[:, -lr - 1:-1].float(), entropy


def policy_logprobs(policy: nn.Module, q_ids, q_mask, r_ids, r_mask, temperature: float) -> torch.Tensor:
    """Log-probs (B, Lr) of the response tokens under a bare causal LM (the reference)."""
    ids, mask, pos = join_query_response(q_ids, q_mask, r_ids, r_mask)
    lr = r_ids.shape[1]
    logits = causal_logits(policy, ids, mask, pos, lr + 1)
    return core.logprobs_from_logits(response_logits(logits, lr, temperature), r_ids)


@dataclass
class AttachedForward:
    """Log-probs and values (B, Lr) of a whole rollout batch under the current policy, still in autograd.

    With one minibatch per epoch and no gradient accumulation, the update's first epoch runs the
    policy and value model on exactly the rollout's rows with exactly the rollout's parameters
    (dropout is off), so the rollout's own forward IS that epoch's forward: its detached copy
    gives pi_old and V_old, and the first epoch backpropagates through it instead of running
    the same forward again (speed switch ``reuse_rollout_forward``,
    :func:`finegrain.speed.reuses_rollout_forward`). The trainer holds it: ``rollout_step``
    returns it beside the :class:`Rollout` and ``ppo_update`` spends it on the first minibatch
    (:meth:`take`), after which nothing holds the graph.
    """

    logprobs: torch.Tensor | None
    values: torch.Tensor | None

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(logprobs, values), once: the object lets go of them, so the graph lives only as long as the loss."""
        if self.logprobs is None:
            raise ValueError("this attached forward was spent already (by an earlier update)")
        out = (self.logprobs, self.values)
        self.logprobs = self.values = None
        return out


@dataclass
class Rollout:
    """One step's rollouts (B per process) and everything the update needs.

    prompts, texts:      prompt strings and decoded responses (B,)
    query_ids/mask:      (B, Lq) left-padded prompt ids
    response_ids/mask:   (B, Lr) right-padded response ids; mask covers tokens up to and incl. EOS
    ended:               (B,) the response emitted EOS
    logprobs:            (B, Lr) log pi_old(a_t) with logits / temperature
    ref_logprobs:        (B, Lr) log pi_ref(a_t), same temperature
    values:              (B, Lr) V(s_t) of the value model before the update
    entropy:             (B, Lr) entropy of pi_old at each response position
    scores:              (B,) RM score (sequence RM score or a token RM's Eq. 1 mean), before any processing
    sequence_scores:     (B,) --sequence-reward-model's score, before any processing (None without one)
    token_rewards:       (B, Lr) RM rewards on policy tokens after normalising/clipping/scaling (token mode;
                         None in sequence mode)
    kl:                  (B, Lr) per-token KL estimate
    rewards:             (B, Lr) the assembled per-token rewards fed to GAE
    non_score_rewards:   (B, Lr) -beta * kl
    advantages, returns: (B, Lr) from GAE (advantages whitened when configured)

    Plain data: no tensor of a finished rollout is in autograd (:class:`AttachedForward` is the
    trainer's).
    """

    prompts: list[str]
    texts: list[str]
    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    ended: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    entropy: torch.Tensor
    scores: torch.Tensor
    sequence_scores: torch.Tensor | None = None
    token_rewards: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    non_score_rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def tensors_out_of_inference_mode(self) -> "Rollout":
        """Clone every tensor so autograd may save it (inference tensors cannot be saved for backward)."""
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return Rollout(**{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})

    #: the fields with one column per response position, (B, Lr)
    PER_TOKEN = ("response_ids", "response_mask", "logprobs", "ref_logprobs", "values", "entropy", "token_rewards",
                 "kl", "rewards", "non_score_rewards", "advantages", "returns")

    def select(self, idx: torch.Tensor, device, trim: bool = True) -> "Rollout":
        """The rollouts at ``idx``, tensors moved to ``device`` (for a minibatch).

        With ``trim``, the columns that are padding in every selected row go: the leading
        query columns (left padding) and the trailing response columns (after the longest
        response's EOS). Nothing the loss reads changes: position ids come from the mask, padded
        positions are masked out of attention, and the losses are means over the response mask.
        A minibatch then costs what its own longest rollout costs, not the whole batch's.
        """
        kw = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                kw[f.name] = v[idx]
            elif isinstance(v, list):
                kw[f.name] = [v[i] for i in idx.tolist()]
            else:
                kw[f.name] = v
        if trim:
            q_from = kw["query_mask"].shape[1] - int(kw["query_mask"].sum(1).max())
            r_to = max(1, int(kw["response_mask"].sum(1).max()))
            kw["query_ids"], kw["query_mask"] = kw["query_ids"][:, q_from:], kw["query_mask"][:, q_from:]
            for name in self.PER_TOKEN:
                if kw[name] is not None:
                    kw[name] = kw[name][:, :r_to]
        return Rollout(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()})


def chunked(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


@torch.inference_mode()
def score_rollout_forward(model: nn.Module | None, ref_policy: nn.Module | None, lora_policy: nn.Module | None,
                          q_ids, q_mask, r_ids, r_mask, temperature: float, batch_size: int, device):
    """logprobs, ref_logprobs, values, entropy (each (B, Lr), on CPU) in chunks of ``batch_size``.

    The reference is ``ref_policy`` or, for LoRA, ``lora_policy`` with its adapters disabled.
    With ``model`` None only ref_logprobs are computed (the caller runs the policy and value
    model itself: :func:`attached_forward`).
    """
    names = ("ref_logprobs",) if model is None else ("ref_logprobs", "logprobs", "values", "entropy")
    outs: dict[str, list[torch.Tensor]] = {k: [] for k in names}
    for sl in chunked(q_ids.shape[0], batch_size):
        args = [t[sl].to(device) for t in (q_ids, q_mask, r_ids, r_mask)]
        if lora_policy is not None:
            with lora_policy.disable_adapter():
                got = [policy_logprobs(lora_policy, *args, temperature)]
        else:
            got = [policy_logprobs(ref_policy, *args, temperature)]
        if model is not None:
            got += forward_response(model, *args, temperature)
        for k, t in zip(names, got):
            outs[k].append(t.float().cpu())
    return {k: torch.cat(v) for k, v in outs.items()}


def attached_forward(model: nn.Module, q_ids, q_mask, r_ids, r_mask, temperature: float, device):
    """(AttachedForward, {logprobs, values, entropy} detached on CPU) of a whole batch under a :class:`PolicyAndValue`.

    One forward WITH autograd, for the rollout (its detached values) and the update's first
    epoch (its graph) at once; see :class:`AttachedForward`.
    """
    args = [t.to(device) for t in (q_ids, q_mask, r_ids, r_mask)]
    args = [t.clone() if t.is_inference() else t for t in args]  # ids sampled under inference_mode cannot be saved
    lp, v, ent = forward_response(model, *args, temperature)
    detached = {"logprobs": lp.detach().float().cpu(), "values": v.detach().float().cpu(), "entropy": ent.float().cpu()}
    return AttachedForward(lp, v), detached


@dataclass
class RewardSettings:
    """Reward options of :func:`process_rewards`, copied from PPOConfig."""

    mode: str                    # sequence or token
    kl_estimator: str            # k1 or k3
    token_reward_scale: str      # raw or mean
    reward_clip: float | None
    missing_eos_penalty: float | None
    whiten_rewards: bool
    gamma: float
    lam: float
    whiten_advantages: bool


def reward_statistic(rm: RewardOutput, s: RewardSettings) -> torch.Tensor:
    """(B,) what ``--reward-norm``'s running moments track: each response's reward as PPO will see it.

    Sequence mode: the RM's score. Token mode: the response's total token reward at the chosen
    ``token_reward_scale``, the sum of r_t for ``raw`` and Eq. 1's mean for ``mean`` and ``prefix`` (their
    rewards sum to it), so that dividing every r_t by the moments' std gives responses' totals a std of 1.
    """
    if s.mode == "sequence" or s.token_reward_scale in ("mean", "prefix"):
        return rm.scores
    return rm.token_rewards.sum(-1)


def process_rewards(r: Rollout, rm: RewardOutput, kl_coef: float, s: RewardSettings,
                    moments: "core.RunningMoments | None" = None, whole: torch.Tensor | None = None) -> Rollout:
    """Fill kl, token_rewards, rewards, non_score_rewards, advantages and returns of ``r``.

    Order: RM output -> running normalisation (optional) -> clip -> token scale -> + (-beta KL),
    the missing-EOS penalty and ``whole`` (B,) at the last token (:func:`core.assemble_rewards`;
    ``whole``: --sequence-reward-coef x the standardised score of --sequence-reward-model) ->
    reward whitening (optional) -> GAE -> advantage whitening.
    """
    mask = r.response_mask.float()
    kl = core.kl_estimate(r.logprobs, r.ref_logprobs, s.kl_estimator) * mask
    bonus = None if whole is None else whole.float()
    if s.missing_eos_penalty:
        penalty = torch.where(r.ended, 0.0, -float(s.missing_eos_penalty)).float()
        bonus = penalty if bonus is None else bonus + penalty
    if s.mode == "sequence":
        score = moments.normalise(rm.scores) if moments is not None else rm.scores
        if s.reward_clip is not None:
            score = score.clamp(-s.reward_clip, s.reward_clip)
        rewards, non_score = core.assemble_rewards(kl, mask, kl_coef, score=score, terminal_bonus=bonus)
        token_rewards = None
    else:
        tr = rm.token_rewards
        if moments is not None:
            tr = moments.scale(tr)
        if s.reward_clip is not None:
            tr = tr.clamp(-s.reward_clip, s.reward_clip)
        token_rewards = core.scale_token_rewards(tr, mask, s.token_reward_scale, rm.n_scored)
        rewards, non_score = core.assemble_rewards(kl, mask, kl_coef, token_rewards=token_rewards,
                                                   terminal_bonus=bonus)
    if s.whiten_rewards:
        rewards = core.masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = core.gae(rewards, r.values, mask, s.gamma, s.lam)
    if s.whiten_advantages:
        advantages = core.masked_whiten(advantages, mask)
    return dataclasses.replace(r, kl=kl, token_rewards=token_rewards, rewards=rewards, non_score_rewards=non_score,
                               advantages=advantages, returns=returns)


@contextlib.contextmanager
def unwrapped_for_generation(accelerator, model: nn.Module):
    """The :class:`PolicyAndValue` with full parameters, for ``generate`` (ZeRO-3 / FSDP gather them)."""
    unwrapped = accelerator.unwrap_model(model)
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and plugin.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(model.parameters()):
            yield unwrapped
        return
    if getattr(accelerator.state, "fsdp_plugin", None) is not None:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model, writeback=False, recurse=True):
            yield unwrapped
        return
    yield unwrapped


def rollout_stats(r: Rollout) -> dict[str, float]:
    """Per-step means of one process's rollouts (reduced over processes by the caller)."""
    mask = r.response_mask.float()
    lengths = mask.sum(-1)
    kl_sum = (r.kl * mask).sum(-1)
    non_score = r.non_score_rewards.sum(-1)
    out = {
        "reward": r.scores.mean().item(),
        "reward_std": r.scores.std().item() if r.scores.numel() > 1 else 0.0,
        "kl": kl_sum.mean().item(),
        "non_score_reward": non_score.mean().item(),
        "total_reward": r.rewards.sum(-1).mean().item(),
        "entropy": core.masked_mean(r.entropy, mask).item(),
        "response_length": lengths.mean().item(),
        "eos_rate": r.ended.float().mean().item(),
        "value_mean": core.masked_mean(r.values, mask).item(),
        "advantage_mean": core.masked_mean(r.advantages, mask).item(),
        "return_mean": core.masked_mean(r.returns, mask).item(),
        "explained_variance": core.explained_variance(r.values, r.returns, mask).item(),
    }
    if r.token_rewards is not None:
        out["token_reward_sum"] = (r.token_rewards * mask).sum(-1).mean().item()
    if r.sequence_scores is not None:
        out["sequence_score"] = r.sequence_scores.mean().item()
    return out


def sample_records(step: int, r: Rollout, n: int) -> list[dict]:
    """The first ``n`` rollouts of a step, for samples.jsonl."""
    rows = []
    for i in range(min(n, len(r.prompts))):
        m = r.response_mask[i].bool()
        extra = {} if r.sequence_scores is None else {"sequence_score": float(r.sequence_scores[i])}
        rows.append({"step": step, "prompt": r.prompts[i], "response": r.texts[i], "score": float(r.scores[i]), **extra,
                     "ended": bool(r.ended[i]), "length": int(m.sum()),
                     "token_rewards": [round(float(x), 4) for x in r.token_rewards[i][m]]
                     if r.token_rewards is not None else None})
    return rows


def make_rollout(prompts: Sequence[str], query_ids: Sequence[Sequence[int]], gen, fwd: dict[str, torch.Tensor],
                 rm: RewardOutput, sequence_scores: torch.Tensor | None = None) -> Rollout:
    """Assemble a :class:`Rollout` from the outputs of generation, the forward passes and the RM."""
    return Rollout(prompts=list(prompts), texts=list(gen.texts), query_ids=gen.query_ids, query_mask=gen.query_mask,
                   response_ids=gen.response_ids, response_mask=gen.response_mask, ended=gen.ended,
                   logprobs=fwd["logprobs"], ref_logprobs=fwd["ref_logprobs"], values=fwd["values"],
                   entropy=fwd["entropy"], scores=rm.scores.float(),
                   sequence_scores=None if sequence_scores is None else sequence_scores.float())
