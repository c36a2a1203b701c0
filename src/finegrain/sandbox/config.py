"""Options of `finegrain demo` (light module: no torch import).

Sizes left at ``None`` take the value of the preset: the full run, ``--quick`` (the first run a
newcomer makes: small, but large enough to show what the full run shows) or ``--smoke`` (CI's
plumbing check: every stage, every file, too small to conclude anything); any size can be set
explicitly.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from ..config import opt
from ..errors import ConfigError
from ..ppo.config import TOKEN_REWARD_SCALES

TOKEN_LOSS_VARIANTS = ("token_edit", "token_mean", "token_edit_u0", "token_label", "token_mean_label")
BACKBONE_SUFFIXES = {"policy": "", "echo": "-echo", "encoder": "-encoder"}
TOKEN_RMS = [f"{loss}{suffix}" for suffix in BACKBONE_SUFFIXES.values() for loss in TOKEN_LOSS_VARIANTS]
"""Names of the demo's token RM variants (sandbox/demo.py builds RM_VARIANTS from the same two tables; this
module stays free of torch)."""

# name -> (full, quick, smoke)
PRESETS: dict[str, tuple] = {
    "n_demos": (3000, 3000, 600),
    "sft_epochs": (5.0, 5.0, 3.0),
    "n_rm_prompts": (3000, 1000, 120),
    "n_heldout_prompts": (400, 300, 60),
    "rm_epochs": (10.0, 10.0, 2.0),
    "n_ppo_prompts": (512, 256, 64),
    "ppo_steps": (60, 40, 4),
    "ppo_batch_size": (32, 32, 8),
    "ppo_seeds": (3, 1, 1),
    "n_eval_prompts": (300, 200, 40),
    "n_val_prompts": (300, 100, 40),
}
PRESET_NAMES = ("full", "quick", "smoke")


def _presets(name: str) -> str:
    """'full X, quick Y, smoke Z' for a size's help text (one source: PRESETS)."""
    return ", ".join(f"{p} {v:g}" for p, v in zip(PRESET_NAMES, PRESETS[name]))


@dataclass
class DemoConfig:
    """The whole method end to end in the simulated environment: SFT -> pairs -> edits -> RMs -> PPO -> eval."""

    out: str = opt("runs/demo", "output directory (stages already completed there with the same options are reused)")
    quick: bool = opt(False, "the first run to make: one PPO seed and smaller sizes, "
                             "large enough to show what the full run shows; sizes left unset take its values")
    smoke: bool = opt(False, "CI's plumbing check: every stage and file at the smallest sizes, too small to conclude "
                             "anything (the report says so)")
    seed: int = opt(0, "seed of the whole run (data, models, sampling, annotators)", ge=0)
    # --- environment
    flaw_rate: float = opt(0.3, "probability that a demonstration sentence carries a flaw")
    noise: float = opt(0.25, "annotator noise: expected disagreement with the gold order (AlpacaFarm: ~0.25)")
    judge_noise: float = opt(0.25, "noise of the gold judge used for win rates (same BT model)")
    # --- sizes (None: from the preset)
    n_demos: int | None = opt(None, "SFT demonstrations" + f" ({_presets('n_demos')})")
    sft_epochs: float | None = opt(None, "SFT epochs" + f" ({_presets('sft_epochs')})")
    n_rm_prompts: int | None = opt(None, "prompts for RM pairs: two SFT samples each"
                                   + f" ({_presets('n_rm_prompts')})")
    n_heldout_prompts: int | None = opt(None, "prompts of the gold-ordered RM evaluation pairs, two fresh SFT samples "
                                              "each, not in the training pairs (and as many for the RM sweep's "
                                              "validation pairs)" + f" ({_presets('n_heldout_prompts')})")
    rm_epochs: float | None = opt(None, "RM epochs, the same for every RM (a tenth of the pairs held out to keep the "
                                        "best evaluation)" + f" ({_presets('rm_epochs')})")
    n_ppo_prompts: int | None = opt(None, "PPO training prompts" + f" ({_presets('n_ppo_prompts')})")
    ppo_steps: int | None = opt(None, "PPO steps per system and seed, the same for every system"
                                      + f" ({_presets('ppo_steps')})")
    ppo_batch_size: int | None = opt(None, "rollouts per PPO step" + f" ({_presets('ppo_batch_size')})")
    ppo_seeds: int | None = opt(None, "PPO seeds per system" + f" ({_presets('ppo_seeds')})")
    n_eval_prompts: int | None = opt(None, "distinct prompts for win rates (fresh samples; drawn, as the PPO prompts are, "
                                     "from the sandbox's 432 prompts, so most of them also occur in training)"
                                     + f" ({_presets('n_eval_prompts')})")
    n_val_prompts: int | None = opt(None, "--sweep: validation comparisons the sweep selects on, on the sandbox prompts NOT "
                                          "among the evaluation prompts (several samples per prompt when there are fewer "
                                          "such prompts)" + f" ({_presets('n_val_prompts')})")
    # --- models and optimisation
    n_embd: int = opt(64, "policy/RM hidden size (tiny GPT-2)", ge=1)
    n_layer: int = opt(2, "policy/RM layers", ge=1)
    vocab_size: int = opt(1200, "BPE vocabulary trained on the demonstrations", ge=1)
    sft_lr: float = opt(5e-3, "SFT learning rate", gt=0)
    sft_batch_size: int = opt(8, "SFT batch size (small batches, many steps: fastest to fluent text on CPU)", ge=1)
    rm_lr: float = opt(1e-3, "RM learning rate", gt=0)
    ppo_lr: float = opt(3e-4, "PPO policy learning rate", gt=0)
    # KL defaults: each system's pick of `finegrain demo --sweep --rm-sweep` (full preset, demo seed 0, PPO seed 0, KL
    # grid {0.05, 0.2, 0.5, 1, 2, 5}, highest win rate on 132 validation prompts x 3 samples not among the evaluation
    # prompts); the token system with its RM, token_mean_label. Two re-runs of 2026-12-07 (other sampling streams)
    # picked 0.5 / 2 / 2 and 0.05 / 0.5 / 2, each pick within two standard errors of its runner-up; the defaults stay
    # (the robustness seeds 3-7 ran with them; see the README, "Choosing the token-reward settings")
    baseline_kl_coef: float = opt(0.2, "PPO KL coefficient of the baseline (original pairs, sequence RM). Sweep, "
                                       "validation win rate in percent at KL 0.05/0.2/0.5/1/2/5: "
                                       "54.3/61.1/59.8/58.3/55.3/55.6 -> 0.2 (re-runs: "
                                       "56.6/57.1/60.1/57.1/57.8/54.0, 62.9/56.8/58.3/53.8/52.8/49.2)", ge=0)
    edit_seq_kl_coef: float = opt(2.0, "PPO KL coefficient of the edit-data sequence-RM system. Sweep: "
                                       "47.7/58.1/58.6/60.1/60.9/59.3 -> 2 (re-runs: 46.5/56.8/58.6/58.8/60.1/57.8, "
                                       "54.8/64.6/65.9/64.1/60.6/58.6)",
                                       ge=0)
    token_kl_coef: float = opt(0.5, "PPO KL coefficient of the token-reward system. Sweep (RM token_mean_label, "
                                    "reward scale mean): 18.7/46.2/63.1/60.1/59.3/56.1 -> 0.5 (re-runs: "
                                    "18.2/43.2/61.9/60.4/62.1/57.3, 18.2/44.2/58.3/61.4/65.2/58.1)", ge=0)
    token_reward_scale: str = opt("mean", "token-reward PPO: raw r_t, r_t / T so a response's rewards sum to Eq. 1 "
                                  "(the sweep: raw rewards pay for length and are exploited), or prefix, the change "
                                  "each token makes to the mean reward so far (also sums to Eq. 1)",
                                  choices=TOKEN_REWARD_SCALES)
    token_sequence_coef: float = opt(0.0, "token-reward PPO plus the edit-data sequence RM (seq_edit): its score, "
                                          "standardised, x this at each response's last token (ppo's "
                                          "--sequence-reward-coef); 0: token rewards alone, the paper's method",
                                     ge=0)
    token_rm: str = opt("token_mean_label", "token RM variant of the token-reward system (loss, plus -echo or -encoder for "
                                       "the backbone): the pick of `--rm-sweep`, see the README", choices=TOKEN_RMS)
    rm_sweep: bool = opt(False, "train every RM variant (backbone x loss, equal data and epochs), score each on the "
                                "evaluation and the validation pairs, and pick the token RM on validation")
    sample_temperature: float = opt(1.0, "temperature of the SFT samples that form the RM pairs", gt=0)
    eval_temperature: float = opt(0.7, "temperature of the evaluation outputs (= PPO's sampling temperature)", gt=0)
    max_new_tokens: int = opt(64, "longest response in tokens", ge=1)
    threads: int = opt(1, "torch CPU threads (1 is fastest for these tiny models on a shared 2-core machine)")
    sweep: bool = opt(False, "also run the tuning sweep: every system over the same KL grid (plus token-reward scale "
                             "variants), one seed, each scored by its win rate on validation prompts disjoint from the "
                             "evaluation prompts; the report shows each system's pick next to its configured KL")

    def validate(self) -> None:
        if self.quick and self.smoke:
            raise ConfigError("give at most one of --quick and --smoke")
        if not 0.0 <= self.flaw_rate <= 1.0:
            raise ConfigError("--flaw-rate must be in [0, 1]")
        for name in ("noise", "judge_noise"):
            if not 0.0 <= getattr(self, name) < 0.5:
                raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 0.5)")
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in PRESETS and v is not None and v <= 0:
                raise ConfigError(f"--{f.name.replace('_', '-')} must be > 0")
        for name in ("n_eval_prompts", "n_val_prompts"):  # a win rate's standard error needs two comparisons
            if self.size(name) < 2:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 2")
        if self.size("n_eval_prompts") > 432:
            raise ConfigError("--n-eval-prompts must be <= 432 (the number of distinct sandbox prompts)")
        if self.sweep and self.size("n_eval_prompts") >= 432:
            raise ConfigError("--sweep needs --n-eval-prompts < 432 (validation prompts are the sandbox prompts not used "
                              "for evaluation)")
        if self.n_embd % 2:  # said here: sft's own message names --n-head, which the demo does not have (it uses 2)
            raise ConfigError("--n-embd must be even: the demo's models have 2 attention heads")
        if self.threads < 1:
            raise ConfigError("--threads must be >= 1")
        if self.size("ppo_batch_size") > 1 and self.size("ppo_batch_size") % 2:  # known before any stage runs
            raise ConfigError("--ppo-batch-size must be even: each PPO step's rollouts are split into 2 minibatches")

    @property
    def preset(self) -> str:
        return "smoke" if self.smoke else "quick" if self.quick else "full"

    def size(self, name: str):
        """The value of a size option: explicit, else the preset's."""
        v = getattr(self, name)
        return v if v is not None else PRESETS[name][PRESET_NAMES.index(self.preset)]
