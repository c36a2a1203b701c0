"""PPOConfig: every option of `finegrain ppo`, with its help text (no torch import here).

Defaults follow "The N+ Implementation Details of RLHF with PPO" (Huang et al. 2024) where it
has one (gamma 1, lambda 0.95, clip 0.2 for policy and value, value coefficient 0.1, KL
coefficient 0.05 with the k1 estimator, 4 PPO epochs, sampling temperature 0.7 in both
rollouts and log-prob computation, whitened advantages, value model initialised from the
reward model, a penalty for responses that never end, dropout off, Adam eps 1e-5).
Derived sizes (minibatch size, micro-batch size) are computed where used, never written back.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import LoggingOptions, TrainerModelOptions, TrainerPrecisionOptions, check_template, opt
from ..errors import ConfigError


# Defaults of --kl-coef per reward mode. Token mode: in the sandbox demo's sweeps with mean-scaled
# token rewards, KL <= 0.2 or raw rewards were exploited; 0.5-1.0 were the best on validation (the
# win rate picked 0.5, the noise-free gold reward 1.0, with half the reward hacking): 1.0, the more
# conservative of the two, is the default (README, Results).
DEFAULT_KL_COEF = {"sequence": 0.05, "token": 1.0}
TOKEN_REWARD_SCALES = ["raw", "mean", "prefix"]  # --token-reward-scale of ppo and demo (core.scale_token_rewards)
# --value-lr's default with --value-init shared, as a multiple of --lr: the value group is then one zero-initialised
# linear head. At --lr it learnt too slowly in the sandbox (quick demo of seed 11, PPO seeds 0-2: explained
# variance 0.07-0.29 against 0.73-0.84 with a separate value model, and less gold reward); at 100 x --lr it reached
# 0.47-0.75 and the separate models' gold reward (benchmarks/RESULTS.md, 2026-12-04).
SHARED_HEAD_LR_FACTOR = 100.0


@dataclass(kw_only=True)
class PPOConfig(TrainerModelOptions, TrainerPrecisionOptions, LoggingOptions):
    """Every option of `finegrain ppo`; model loading, precision and logging are the shared groups (config.py)."""

    # --- what to train, on what
    policy: str = opt(help="policy to train: a checkpoint directory, a hub name or a short name (causal LM)")
    reward_model: str = opt(help="reward model directory (finegrain.json 'kind': token or sequence)")
    reward_mode: str = opt(help="sequence: the RM's scalar on the last response token (a token RM gives its "
                           "Eq. 1 mean); token: each response token gets the token RM's r_t (paper section 4)",
                           choices=["sequence", "token"])
    prompts: str = opt(help="prompts: .jsonl/.json/.jsonl.gz/.parquet or a datasets name, one record per prompt")
    output: str = opt(help="output directory: checkpoints/, final/ (the trained policy), metrics.jsonl, samples.jsonl")
    prompt_field: str = opt("prompt", "name of the record field holding the prompt text")
    steps: int = opt(100, "PPO steps (each = one batch of rollouts, then the update)", ge=1)
    resume: bool = opt(False, "continue from the latest checkpoint in OUTPUT/checkpoints")
    seed: int = opt(0, "random seed (step s samples with a seed made of it and s, so resumed runs repeat it)", ge=0,
                    le=2 ** 64 - 1)
    # --- batch sizes
    batch_size: int = opt(16, "rollouts per step per process (the global batch is this x number of processes)", ge=1)
    num_minibatches: int = opt(4, "minibatches per PPO epoch, a divisor of --batch-size (one rollout each when it "
                               "exceeds it; ignored when --mini-batch-size is set)", ge=1)
    mini_batch_size: int | None = opt(None, "rollouts per minibatch (per process); must divide --batch-size", ge=1)
    ppo_epochs: int = opt(4, "passes over the rollouts of a step (Huang et al.: 4)", ge=1)
    grad_accum: int = opt(1, "micro-batches per minibatch: gradients are accumulated, one optimizer step per minibatch",
                          ge=1)
    forward_batch_size: int = opt(16, "rollouts per forward pass when computing log-probs, values and RM scores", ge=1)
    # --- optimisation
    lr: float = opt(3e-6, "policy learning rate (Huang et al.: 3e-6 for 1B-7B models)", gt=0)
    value_lr: float | None = opt(None, "value model learning rate (default: --lr; with --value-init shared, where it "
                                 f"is the value head's alone, {SHARED_HEAD_LR_FACTOR:g} x --lr)", gt=0)
    lr_schedule: str = opt("linear", "learning-rate schedule over --steps", choices=["linear", "constant"])
    adam_eps: float = opt(1e-5, "Adam epsilon (Huang et al.: 1e-5)", gt=0)
    max_grad_norm: float | None = opt(1.0, "clip the gradient norm to this (null: no clipping)", gt=0)
    # --- PPO
    gamma: float = opt(1.0, "discount factor (Huang et al.: 1.0)", ge=0, le=1)
    lam: float = opt(0.95, "GAE lambda (Huang et al.: 0.95)", ge=0, le=1)
    cliprange: float = opt(0.2, "policy ratio clip epsilon (Huang et al.: 0.2)", gt=0)
    cliprange_value: float | None = opt(0.2, "value clip range around the rollout values (null: no value clipping)",
                                        gt=0)
    vf_coef: float = opt(0.1, "value loss coefficient (Huang et al.: 0.1)", ge=0)
    whiten_advantages: bool = opt(True, "whiten advantages over the step's rollouts (Huang et al.: on)")
    # --- rewards and KL
    kl_coef: float | None = opt(None, "KL coefficient beta (initial value when --adaptive-kl); default by reward "
                                "mode: sequence 0.05 (Huang et al.), token 1.0 (with --token-reward-scale mean: the "
                                "best of the sandbox's KL sweep, where low KL let PPO exploit the token RM; README)",
                                ge=0)
    kl_estimator: str = opt("k1", "per-token KL estimator in the reward: k1 = log pi - log pi_ref; "
                            "k3 = (r - 1) - log r, r = pi_ref / pi (non-negative, lower variance)",
                            choices=["k1", "k3"])
    adaptive_kl: bool = opt(False, "adapt beta towards --target-kl (Ziegler et al. 2019)")
    target_kl: float = opt(6.0, "target summed KL per response for --adaptive-kl (Ziegler et al.: 6)", gt=0)
    kl_horizon: int = opt(10000, "horizon of the adaptive KL controller, in rollouts (Ziegler et al.: 10000)", ge=1)
    token_reward_scale: str = opt("mean", "token mode: raw = r_t as the RM gives it; mean = r_t / T so a response's "
                                  "rewards sum to Eq. 1; prefix = the change token t makes to the mean reward of the "
                                  "tokens so far (also sums to Eq. 1, and each reward depends on the tokens up to t "
                                  "only)", choices=TOKEN_REWARD_SCALES)
    sequence_reward_model: str | None = opt(None, "a second reward model judging each whole response (its score: a "
                                            "sequence RM's, or a token RM's Eq. 1 mean); standardised by its running "
                                            "mean and std, x --sequence-reward-coef, it is added at the last token on "
                                            "top of --reward-model's rewards: token rewards for what the edits fixed, "
                                            "this score for what no token carries (length, coverage)")
    sequence_reward_coef: float = opt(1.0, "weight of --sequence-reward-model's standardised score (with "
                                      "--reward-norm the token rewards' totals have std 1 too)", ge=0)
    reward_clip: float | None = opt(None, "clip RM scores and token rewards to [-c, c] (null: no clipping)", gt=0)
    reward_norm: bool = opt(False, "standardise RM rewards by running mean/std statistics (over all steps)")
    whiten_rewards: bool = opt(False, "whiten the per-token rewards of each step (scale only) before GAE")
    missing_eos_penalty: float | None = opt(1.0, "subtracted from the last-token reward of responses that never emit "
                                            "EOS (Huang et al.'s EOS trick; null: off)", ge=0)
    # --- rollouts
    max_new_tokens: int = opt(64, "maximum response tokens", ge=1)
    max_prompt_length: int = opt(256, "longest prompt in policy tokens; longer prompts are refused", ge=1)
    temperature: float = opt(0.7, "sampling temperature, also used for the log-probs (logits / T) (Huang et al.: 0.7)",
                             gt=0)
    top_k: int = opt(0, "top-k sampling (0: off); keep off so log-probs match the sampling distribution", ge=0)
    top_p: float = opt(1.0, "nucleus sampling (1.0: off); keep off so log-probs match the sampling distribution",
                       gt=0, le=1)
    prompt_template: str | None = opt(None, "template with {prompt} for tokenizers without a chat template "
                                      "(default '{prompt}\\n'); must match the RM's training")
    rm_max_length: int | None = opt(None, "reward model input length (default: max prompt + max new tokens + 1, "
                                    "capped by the RM's context)", ge=2)
    # --- models
    value_init: str = opt("reward", "value model initialisation: reward = the reward model (Huang et al.), "
                          "policy = the policy's backbone with a fresh head; shared = no value model: a "
                          "zero-initialised value head on the policy's last hidden state, one forward and backward for "
                          "both (less time and memory, but a different algorithm: the value loss also trains the "
                          "policy's backbone)",
                          choices=["reward", "policy", "shared"])
    param_dtype: str = opt("fp32", "dtype the policy, value, reference and reward models are held and run in. bf16 "
                           "(with --mixed-precision bf16): every forward and backward runs in bf16 end to end, and "
                           "the optimizer steps fp32 master copies of the trained weights; the final weights are the "
                           "masters. Less memory than autocast over fp32 weights, no faster on the CPUs measured "
                           "(README). Not with FSDP or DeepSpeed, which keep masters of their own", choices=["fp32", "bf16"])
    use_lora: bool = opt(False, "train LoRA adapters (peft); the reference is the same model with adapters disabled")
    lora_r: int = opt(16, "LoRA rank", ge=1)
    lora_alpha: int = opt(32, "LoRA alpha", gt=0)
    lora_dropout: float = opt(0.0, "LoRA dropout: must stay 0, PPO runs every model with dropout off (Huang et al.)",
                              ge=0, lt=1)
    lora_target_modules: list[str] | None = opt(None, "module names to adapt (default: peft's choice for the model)")
    cross_tokenizer: bool = opt(False, "allow an RM whose tokenizer differs from the policy's: responses are decoded, "
                                "re-tokenised for the RM and token rewards mapped back by character offsets")
    # --- bookkeeping
    save_every: int = opt(50, "checkpoint every N steps (and at the end)", ge=1)
    keep_checkpoints: int = opt(2, "how many recent checkpoints to keep", ge=1)
    sample_every: int = opt(10, "write sample generations to samples.jsonl every N steps and at the last (0: never)",
                            ge=0)
    num_samples: int = opt(4, "generations written per sampling", ge=0)

    def validate(self) -> None:
        """Checks across fields (bounds of single fields are declared with them; model and data: the pre-flight)."""
        super().validate()
        check_template(self.prompt_template, "--prompt-template")
        if self.param_dtype == "bf16" and self.mixed_precision != "bf16":
            raise ConfigError(f"--param-dtype bf16 runs under bf16 autocast: add --mixed-precision bf16 (not "
                              f"{self.mixed_precision!r})")
        if self.sequence_reward_model is None and self.sequence_reward_coef != 1.0:
            raise ConfigError(f"--sequence-reward-coef {self.sequence_reward_coef} weighs --sequence-reward-model's "
                              "score, and none is given: add --sequence-reward-model DIR")
        if self.adaptive_kl and self.initial_kl_coef() == 0:
            raise ConfigError("--adaptive-kl multiplies beta towards --target-kl, so a --kl-coef of 0 never moves; "
                              "give a positive initial --kl-coef")
        if self.lora_dropout > 0:
            raise ConfigError(f"--lora-dropout {self.lora_dropout} would do nothing: PPO runs every model with dropout "
                              "off (Huang et al.), so that the rollout's log-probs and the update's come from one "
                              "network; leave it at 0")
        if self.mini_batch_size is None and self.batch_size % self.num_minibatches and \
                self.num_minibatches < self.batch_size:  # (more minibatches than rollouts: one rollout each)
            raise ConfigError(f"--num-minibatches {self.num_minibatches} does not divide --batch-size "
                              f"{self.batch_size}: minibatches of {self.minibatch_size()} rollouts would make "
                              f"{-(-self.batch_size // self.minibatch_size())} of them; choose a divisor or set "
                              "--mini-batch-size")
        mb = self.minibatch_size()
        if self.batch_size % mb or mb % self.grad_accum:
            raise ConfigError(f"--batch-size {self.batch_size} must split into minibatches of {mb} rollouts and each "
                              f"minibatch into --grad-accum {self.grad_accum} equal micro-batches")

    def initial_kl_coef(self) -> float:
        """--kl-coef, or the reward mode's default (see its help)."""
        if self.kl_coef is not None:
            return self.kl_coef
        return DEFAULT_KL_COEF[self.reward_mode]

    def value_learning_rate(self) -> float:
        """--value-lr, or its default: --lr, or with --value-init shared SHARED_HEAD_LR_FACTOR x --lr."""
        if self.value_lr is not None:
            return self.value_lr
        return self.lr * (SHARED_HEAD_LR_FACTOR if self.value_init == "shared" else 1.0)

    def minibatch_size(self) -> int:
        """Rollouts per minibatch (per process)."""
        if self.mini_batch_size is not None:
            return self.mini_batch_size
        return max(1, self.batch_size // self.num_minibatches)
