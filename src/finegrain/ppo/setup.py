"""Pre-flight checks and model loading for PPO: bad input is refused before any weights load.

:func:`preflight` reads only tokenizers, configs and the prompt file and raises one
:class:`ConfigError` / :class:`InputError` line for: an empty prompt set, a missing or empty
prompt, a prompt that leaves no room for the response, a sequence RM asked for token
rewards, an RM whose tokenizer differs from the policy's without ``--cross-tokenizer``, a
value model initialised from such an RM or from a model type without a token-classification
head (OPT, Gemma 3), and a policy tokenizer without EOS.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError, InputError
from ..io import iter_records
from ..models import clamp_max_length, is_encoder_model, load_config, load_tokenizer, missing_head, read_meta
from .. import speed
from ..rm.inputs import check_view
from ..rm.model import reward_model_kind
from ..tokens import encode_prompts, format_prompt
from .config import PPOConfig
from .rewards import tokenizers_match


@dataclass
class RewardModelInputs:
    """What the pre-flight established about a reward model (nothing heavy is loaded yet).

    path:           its directory
    tokenizer:      its tokenizer
    kind:           "token" or "sequence"
    max_length:     its input length when scoring
    same_tokenizer: it shares the policy's tokenizer (no offset mapping)
    view:           how a token RM reads a response (``causal`` or ``echo``, from its finegrain.json)
    """

    path: str
    tokenizer: object
    kind: str
    max_length: int
    same_tokenizer: bool
    view: str = "causal"


@dataclass
class RunInputs:
    """What the pre-flight established (nothing heavy is loaded yet).

    prompts:       raw prompt strings, in file order
    query_ids:     formatted, tokenised prompts (policy tokenizer), one list of ids per prompt
    tokenizer:     the policy's tokenizer (left padding)
    rm_tokenizer:  the reward model's tokenizer
    rm_kind:       "token" or "sequence"
    rm_max_length: RM input length used for scoring
    same_tokenizer: RM and policy share their tokenizer (no offset mapping)
    rm_view:       how the token RM reads a response (``causal`` or ``echo``, from its finegrain.json)
    sequence_rm:   --sequence-reward-model's inputs, or None
    """

    prompts: list[str]
    query_ids: list[list[int]]
    tokenizer: object
    rm_tokenizer: object
    rm_kind: str
    rm_max_length: int
    same_tokenizer: bool
    rm_view: str = "causal"
    sequence_rm: RewardModelInputs | None = None


def model_context_length(name_or_path: str, trust_remote_code: bool = False) -> int | None:
    """Longest input the model's config allows (max_position_embeddings / n_positions), if it says."""
    from ..models import context_length, load_config

    return context_length(load_config(name_or_path, trust_remote_code=trust_remote_code))


def load_prompts(cfg: PPOConfig) -> list[str]:
    """Prompt strings of ``cfg.prompts``; every record needs a non-empty string field."""
    prompts = []
    for loc, rec in iter_records(cfg.prompts):
        value = rec.get(cfg.prompt_field)
        if not isinstance(value, str) or not value.strip():
            what = "is missing" if value is None else "must be a non-empty string"
            raise InputError(what, path=cfg.prompts, record=loc, field=cfg.prompt_field)
        prompts.append(value)
    if not prompts:
        raise InputError("no prompts: the prompt set is empty", path=cfg.prompts)
    return prompts


def preflight(cfg: PPOConfig) -> RunInputs:
    """Validate everything that can be validated without loading weights; see the module docstring."""
    rm_kind = reward_model_kind(cfg.reward_model)
    if cfg.reward_mode == "token" and rm_kind == "sequence":
        raise ConfigError(f"--reward-mode token needs a token-level reward model, but {cfg.reward_model} is a "
                          "sequence RM (one score per response); use --reward-mode sequence or a token RM")
    tok = load_tokenizer(cfg.policy, trust_remote_code=cfg.trust_remote_code, padding_side="left")
    if tok.eos_token_id is None:
        raise ConfigError(f"the policy tokenizer of {cfg.policy!r} has no EOS token, so responses could never end; "
                          "set tokenizer.eos_token and save it with the policy")
    rm = reward_model_inputs(cfg, cfg.reward_model, tok, "--reward-model")
    if not rm.same_tokenizer and cfg.value_init == "reward":
        raise ConfigError("--value-init reward needs the RM to share the policy's tokenizer (the value model reads "
                          "policy tokens); use --value-init policy with --cross-tokenizer")
    seq = None
    if cfg.sequence_reward_model is not None:
        seq = reward_model_inputs(cfg, cfg.sequence_reward_model, tok, "--sequence-reward-model")
    if cfg.value_init == "reward" and is_encoder_model(load_config(cfg.reward_model, cfg.trust_remote_code)):
        raise ConfigError(f"--value-init reward: {cfg.reward_model} is an encoder, whose outputs at token t see the "
                          "tokens after t; a value model must not see the future; use --value-init policy")
    if cfg.value_init != "shared":
        why = missing_head(load_config(_value_source(cfg), cfg.trust_remote_code), "token")
        if why:
            raise ConfigError(f"--value-init {cfg.value_init}: the value model is a token classifier on "
                              f"{_value_source(cfg)}, but {why}")
    prompts = load_prompts(cfg)
    query_ids = encode_prompts(tok, [format_prompt(tok, p, cfg.prompt_template) for p in prompts])
    ctx = model_context_length(cfg.policy, cfg.trust_remote_code)
    limit = cfg.max_prompt_length if ctx is None else min(cfg.max_prompt_length, ctx - cfg.max_new_tokens)
    if limit < 1:
        raise ConfigError(f"--max-new-tokens {cfg.max_new_tokens} leaves no room for a prompt in the policy's "
                          f"context of {ctx} tokens")
    for i, ids in enumerate(query_ids):
        if len(ids) > limit:
            raise InputError(f"prompt is {len(ids)} tokens after formatting; at most {limit} leave room for "
                             f"--max-new-tokens {cfg.max_new_tokens} (context {ctx}, --max-prompt-length "
                             f"{cfg.max_prompt_length})", path=cfg.prompts, record=f"prompt {i + 1}",
                             field=cfg.prompt_field)
    return RunInputs(prompts, [list(q) for q in query_ids], tok, rm.tokenizer, rm.kind, rm.max_length,
                     rm.same_tokenizer, rm.view, seq)


def reward_model_inputs(cfg: PPOConfig, path: str, tok, flag: str) -> RewardModelInputs:
    """A reward model's tokenizer, kind, view and input length, checked against the policy's tokenizer ``tok``."""
    kind = reward_model_kind(path)
    rm_tok = load_tokenizer(path, trust_remote_code=cfg.trust_remote_code)
    same = tokenizers_match(tok, rm_tok)
    if not same and not cfg.cross_tokenizer:
        raise ConfigError(f"the tokenizer of {flag} {path} differs from the policy's (vocabulary, EOS or pair "
                          "layout); pass --cross-tokenizer to decode responses, re-tokenise them for the RM and map "
                          "token rewards back by character offsets")
    if not same and kind == "token" and not getattr(rm_tok, "is_fast", False):  # (its r_t are mapped in any mode)
        raise ConfigError(f"--cross-tokenizer with a token RM ({flag} {path}) needs a fast (Rust) tokenizer for "
                          "character offsets")
    view = read_meta(path).get("token_view", "causal") if kind == "token" else "causal"
    check_view(rm_tok, view)
    copies = 2 if view == "echo" else 1  # the echo view reads the response twice
    if cfg.rm_max_length:
        rm_max = clamp_max_length(cfg.rm_max_length, path, cfg.trust_remote_code, flag="--rm-max-length")
    else:  # the default needs no warning: the response keeps priority, the prompt is cut from its left
        rm_ctx = model_context_length(path, cfg.trust_remote_code)
        rm_max = cfg.max_prompt_length + copies * (cfg.max_new_tokens + 1)
        rm_max = min(rm_max, rm_ctx) if rm_ctx is not None else rm_max
    return RewardModelInputs(path, rm_tok, kind, rm_max, same, view)


@dataclass
class LoadedModels:
    """policy (maybe a peft model), value model (None with ``--value-init shared``), reference policy (None with
    LoRA), reward model, --sequence-reward-model (or None)."""

    policy: object
    value_model: object | None
    ref_policy: object | None
    reward_model: object
    sequence_reward_model: object | None = None


def load_models(cfg: PPOConfig, run: RunInputs, device_type: str = "cpu") -> LoadedModels:
    """Policy, value model (from the RM or the policy backbone), reference and RM; dropout off everywhere.

    ``device_type`` (the accelerator's, e.g. "cpu" or "cuda") selects the attention kernel with
    ``cfg.attn_implementation`` and ``cfg.mixed_precision`` (:func:`finegrain.models.pick_attention`).
    """
    from ..models import load_model

    kw = _load_kwargs(cfg, device_type, longest_prompt=max(map(len, run.query_ids), default=0))
    policy = load_model(cfg.policy, "causal", tokenizer=run.tokenizer, **kw)
    if cfg.attn_implementation == "auto":  # eager for the training forwards; sampling is faster through SDPA
        speed.allow_sdpa_sampling(policy)
    value_model = None if cfg.value_init == "shared" else load_model(_value_source(cfg), "token",
                                                                      tokenizer=run.tokenizer, **kw)
    reward_model = load_model(cfg.reward_model, run.rm_kind, tokenizer=run.rm_tokenizer, **kw)
    ref = None
    if cfg.use_lora:
        policy = add_lora(policy, cfg)
    else:
        ref = load_model(cfg.policy, "causal", tokenizer=run.tokenizer, **kw)
        ref.requires_grad_(False)
    seq_rm = None
    if run.sequence_rm is not None:
        seq_rm = load_model(run.sequence_rm.path, run.sequence_rm.kind, tokenizer=run.sequence_rm.tokenizer, **kw)
    for m in (policy, value_model, ref, reward_model, seq_rm):
        if m is not None:
            m.eval()  # dropout off (Huang et al.); gradients still flow
    for m in (reward_model, seq_rm):
        if m is not None:
            m.requires_grad_(False)
    return LoadedModels(policy, value_model, ref, reward_model, seq_rm)


def _value_source(cfg: PPOConfig) -> str:
    """The checkpoint the value model starts from (``--value-init``; shared: the policy's own backbone)."""
    return cfg.reward_model if cfg.value_init == "reward" else cfg.policy


def _load_kwargs(cfg: PPOConfig, device_type: str, longest_prompt: int | None = None) -> dict:
    """``load_model`` keywords of every PPO model. With ``longest_prompt`` (policy tokens), ``auto`` attention
    weighs what eager attention would keep for the update's backward pass: the policy and the value
    model (the policy alone with a shared backbone), over a micro-batch of the longest prompt plus ``max_new_tokens``
    (:func:`finegrain.models.pick_attention`)."""
    from ..models import eager_attention_bytes, load_config, load_dtype, pick_attention

    eager_bytes = None
    if longest_prompt is not None and cfg.attn_implementation == "auto":
        rows = max(1, cfg.minibatch_size() // cfg.grad_accum)
        length = longest_prompt + cfg.max_new_tokens
        trained = (cfg.policy,) if cfg.value_init == "shared" else (cfg.policy, _value_source(cfg))
        eager_bytes = sum(eager_attention_bytes(load_config(name, cfg.trust_remote_code), rows, length)
                          for name in trained)
    dtype = load_dtype(cfg.dtype, cfg.policy, cfg.trust_remote_code)  # auto: the policy's, for every model
    return dict(trust_remote_code=cfg.trust_remote_code, dtype=dtype,
                attn_implementation=pick_attention(cfg.attn_implementation, cfg.mixed_precision, device_type,
                                                   eager_bytes))


def lora_on_loaded_base(policy, cfg: PPOConfig, run: RunInputs):
    """``policy``'s LoRA adapters on a freshly loaded base policy, in the dtype ``--dtype`` loads it in.

    What the final LoRA merge starts from when the live policy's frozen base layers were stored
    in bf16 for autocast (:func:`finegrain.speed.lower_frozen_weights`): merging into those would
    round every base weight of the saved model to bf16.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from ..models import load_model

    fresh = add_lora(load_model(cfg.policy, "causal", tokenizer=run.tokenizer, **_load_kwargs(cfg, "cpu")), cfg)
    set_peft_model_state_dict(fresh, get_peft_model_state_dict(policy))
    return fresh


def add_lora(policy, cfg: PPOConfig):
    """Wrap the policy in LoRA adapters (peft); the frozen base doubles as the reference."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ConfigError("--use-lora needs peft: pip install 'finegrain[peft]'") from e
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM")
    try:
        return get_peft_model(policy, lcfg)
    except ValueError as e:
        raise ConfigError(f"cannot add LoRA adapters: {e}; set --lora-target-modules") from e
