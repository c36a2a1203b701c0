"""finegrain's benchmarks against its peer, side by side in one run: ``python benchmarks/run.py [--quick]``.

Machines are noisy (and shared), so every figure is a ratio of two systems measured in the
same run, trial by trial, alternating the order (A B, B A, ...), each trial in its own
subprocess (``worker.py``) so memory, threads and allocator state never leak between sides.
The output ends with one ``RESULT <name>=<number>`` line per figure; a benchmark that fails
prints ``RESULT <name>=nan`` and its reason, and the rest still run. ``--json FILE`` keeps
every raw measurement. What each figure means, and its goal, is in RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import REAL_LORA, REAL_POLICY, machine_info, policy_with_length, summary, train_flops_per_token  # noqa: E402
from convergence import convergence_summary  # noqa: E402
import curves  # noqa: E402
from robustness import SEEDS as ROBUST_SEEDS, robustness_summary  # noqa: E402

PY = sys.executable


# the real arm's PPO settings, {tune}_{prec} (--real-arms)
REAL_PPO_ARMS = tuple(f"{tune}_{prec}" for tune in ("full", "lora") for prec in ("fp32", "bf16"))


@dataclass
class Settings:
    """Sizes of one run (``--quick`` or full)."""

    rounds: int                # alternating trials per comparison
    ppo_steps: int             # PPO steps per trial, the first one is the warm-up
    batch_size: int            # rollouts per PPO step
    response_length: int       # forced: every response has exactly this many tokens
    ppo_epochs: int
    num_minibatches: int
    rm_pairs: int              # pairs per reward-model trial (one epoch)
    rm_batch: int
    demo_seeds: int
    demo_quick: bool
    warmup_steps: int = 1
    rm_warmup_steps: int = 2
    precisions: tuple[str, ...] = ("no", "bf16")  # PPO arms: each runs BOTH systems in that precision
    real_rounds: int | None = None  # the real-model arm's rounds (default RealSettings.rounds)
    plot: str | None = None  # where the curves benchmark draws its PNG
    real_before_after: tuple[str, ...] = ()  # the real arm also runs finegrain without these BEFORE_AFTER paths
    real_arms: tuple[str, ...] = REAL_PPO_ARMS + ("rm",)  # what the real arm runs (--real-arms)
    real_variants: tuple[str, ...] = ()  # the real arm also runs finegrain's bf16 arms with these REAL_VARIANTS


QUICK = Settings(rounds=5, ppo_steps=7, batch_size=16, response_length=32, ppo_epochs=4, num_minibatches=1,
                 rm_pairs=128, rm_batch=16, demo_seeds=3, demo_quick=True)
FULL = Settings(rounds=5, ppo_steps=9, batch_size=32, response_length=48, ppo_epochs=4, num_minibatches=1,
                rm_pairs=512, rm_batch=16, demo_seeds=3, demo_quick=False)

PPO_COMMON = dict(seed=0, learning_rate=1e-5, temperature=1.0, kl_coef=0.05)


class BenchFailed(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def worker(task: str, assets: Path, logs: Path, tag: str, timeout: float = 1800, **kwargs) -> dict[str, Any]:
    """Run one trial in a fresh process; its stdout/stderr go to ``logs/tag.log``."""
    out = logs / f"{tag}.json"
    cmd = [PY, str(HERE / "worker.py"), task, "--assets", str(assets), "--out", str(out)]
    cmd += [f"{k}={json.dumps(v)}" for k, v in kwargs.items()]
    with open(logs / f"{tag}.log", "w") as f:
        try:
            p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise BenchFailed(f"{tag} took longer than {timeout:.0f}s") from e
    if p.returncode != 0 or not out.exists():
        tail = (logs / f"{tag}.log").read_text().strip().splitlines()[-3:]
        raise BenchFailed(f"{tag} exited {p.returncode}: " + " | ".join(tail))
    return json.loads(out.read_text())


def rate(result: dict[str, Any], per_step: float, warmup: int) -> float:
    """Units per wall second over the steps after ``warmup``."""
    times = result["step_s"][warmup:]
    if not times:
        raise BenchFailed(f"{result.get('system')}: no steps after the warm-up")
    return per_step * len(times) / sum(times)


def rotated(items: list, r: int) -> list:
    """``items`` started at position r (mod their number), so each round runs them in another order; [] stays []."""
    if not items:
        return []
    k = r % len(items)
    return items[k:] + items[:k]


# ---------------------------------------------------------------- benchmarks


PPO_ARMS = {  # name: (task, precision, extra arguments)
    "fg_seq": ("fg_ppo", "no", dict(reward_mode="sequence", peak_probe_s=0.5, peak_probe_dtype="fp32")),
    "trl": ("trl_ppo", "no", {}),
    "fg_pair": ("fg_ppo_pair", "no", {}),  # token and sequence reward, stepped in turn in one process
    "fg_seq_bf16": ("fg_ppo", "bf16", dict(reward_mode="sequence", peak_probe_s=0.5, peak_probe_dtype="bf16",
                                          mixed_precision="bf16")),
    "trl_bf16": ("trl_ppo", "bf16", dict(mixed_precision="bf16")),
    # TRL given the rest of finegrain's bf16 setting: every rollout call under autocast (its bf16 mode autocasts only
    # the update), eager attention, bf16 frozen models, freed memory kept (trl_side._match_finegrain_bf16)
    "trl_matched_bf16": ("trl_ppo", "bf16", dict(mixed_precision="bf16", matched=True)),
    # not like for like: --value-init shared, one backbone for policy and value (a change of the algorithm)
    "fg_shared_bf16": ("fg_ppo", "bf16", dict(reward_mode="sequence", mixed_precision="bf16", value_init="shared")),
    # the same algorithm in other numerics: bf16 weights with fp32 master weights instead of autocast over fp32 weights
    "fg_weights_bf16": ("fg_ppo", "bf16", dict(reward_mode="sequence", mixed_precision="bf16", param_dtype="bf16")),
}


def bench_ppo(s: Settings, assets: Path, logs: Path, state: dict) -> dict[str, tuple[float, str]]:
    """ppo_speedup_vs_trl (both in bf16), ppo_speedup_vs_trl_fp32 and token_vs_sequence_cost (fp32), and
    shared_backbone_vs_trl: finegrain with ``--value-init shared`` (one backbone for policy and value, a
    different algorithm) against TRL's separate value model, both bf16.

    Every arm is one system in one precision; the two systems of a ratio always share the
    precision (TRL's PPOTrainer gets bf16 through ``ACCELERATE_MIXED_PRECISION``, see trl_side).
    """
    kw = dict(steps=s.ppo_steps, batch_size=s.batch_size, response_length=s.response_length,
              ppo_epochs=s.ppo_epochs, num_minibatches=s.num_minibatches, **PPO_COMMON)
    systems = {k: v for k, v in PPO_ARMS.items() if v[1] in s.precisions}
    tps: dict[str, list[float]] = {k: [] for k in systems}
    failed: dict[str, str] = {}  # a system that fails once is dropped; figures not needing it still come out
    state["ppo_runs"] = []
    for r in range(s.rounds):
        for name in rotated(list(systems), r):
            if name in failed:
                continue
            task, _, extra = systems[name]
            try:
                res = worker(task, assets, logs, f"ppo_{name}_{r}", **kw, **extra)
                if name == "fg_pair":  # per step: token-reward step time / the sequence-reward one beside it
                    seq, tok = (res["step_s"][m][s.warmup_steps:] for m in ("sequence", "token"))
                    if not seq:
                        raise BenchFailed("fg_pair: no steps after the warm-up")
                    tps[name].append(statistics.median(t / q for t, q in zip(tok, seq)))
                else:
                    tps[name].append(rate(res, res["response_tokens_per_step"], s.warmup_steps))
            except BenchFailed as e:
                failed[name] = str(e)
                log(f"  round {r} {name} failed: {e}")
                continue
            state["ppo_runs"].append({"round": r, "name": name, **res})
            log(f"  round {r} {name}: " + (f"token / sequence step time {tps[name][-1]:.3f} (paired steps, one "
                                           "process)" if name == "fg_pair" else
                                           f"{tps[name][-1]:.1f} response tokens/s"))
    state["ppo_tokens_per_s"] = {k: summary(v) for k, v in tps.items() if k != "fg_pair"}
    state["token_vs_sequence_per_round"] = tps.get("fg_pair", [])
    med = {k: summary(v)["median"] for k, v in tps.items() if v}

    def figure(a: str, b: str | None, what: str = "") -> tuple[float, str]:
        """Median over rounds of tokens/s(a) / tokens/s(b), or of a's own per-round ratio when b is None."""
        if a not in systems or (b is not None and b not in systems):
            return math.nan, f"not run (--precisions {','.join(s.precisions)})"
        if a in failed or b in failed:
            return math.nan, failed.get(a) or failed[b]
        sm = summary(tps[a] if b is None else [x / y for x, y in zip(tps[a], tps[b])])
        return sm["median"], f"min {sm['min']:.3f} max {sm['max']:.3f} over {sm['n']} rounds{what}"

    def tokens(a: str, b: str) -> str:
        return f"; tokens/s finegrain {med[a]:.1f}, TRL {med[b]:.1f}" if a in med and b in med else ""

    shipped = ""  # TRL as its documentation runs it (its bf16 flag alone leaves it in fp32)
    if "fg_seq_bf16" in med and "trl" in med:
        shipped = f"; against TRL in fp32 {med['fg_seq_bf16'] / med['trl']:.2f}x"
    return {"ppo_speedup_vs_trl": figure("fg_seq_bf16", "trl_bf16", " (each system's bf16 mode: TRL's autocasts "
                                         "only its update)" + tokens("fg_seq_bf16", "trl_bf16") + shipped),
            "ppo_speedup_vs_trl_matched": figure("fg_seq_bf16", "trl_matched_bf16", " (TRL given finegrain's bf16 "
                                                 "setting: every pass under autocast, eager attention, bf16 frozen "
                                                 "models, freed memory kept)"
                                                 + tokens("fg_seq_bf16", "trl_matched_bf16")),
            "ppo_speedup_vs_trl_fp32": figure("fg_seq", "trl", " (both fp32)" + tokens("fg_seq", "trl")),
            "shared_backbone_vs_trl": figure("fg_shared_bf16", "trl_bf16", " (bf16; finegrain --value-init shared, "
                                             "one backbone for policy and value: not the same algorithm)"
                                             + tokens("fg_shared_bf16", "trl_bf16")),
            "bf16_weights_vs_trl": figure("fg_weights_bf16", "trl_bf16", " (finegrain --param-dtype bf16: bf16 "
                                          "weights, fp32 masters; TRL bf16 autocast)"
                                          + tokens("fg_weights_bf16", "trl_bf16")),
            "token_vs_sequence_cost": figure("fg_pair", None, " (fp32; per round the median over paired steps "
                                                               "in one process)")}


def bench_rm(s: Settings, assets: Path, logs: Path, state: dict) -> dict[str, tuple[float, str]]:
    kw = dict(n_pairs=s.rm_pairs, batch_size=s.rm_batch, max_length=256, seed=0, learning_rate=1e-4)
    systems = {"fg": "fg_rm", "trl": "trl_rm"}
    pps: dict[str, list[float]] = {k: [] for k in systems}
    for r in range(s.rounds):
        for name in rotated(list(systems), r):
            res = worker(systems[name], assets, logs, f"rm_{name}_{r}", **kw)
            pps[name].append(rate(res, res["pairs_per_step"], s.rm_warmup_steps))
            log(f"  round {r} {name}: {pps[name][-1]:.1f} pairs/s")
    ratios = summary([a / b for a, b in zip(pps["fg"], pps["trl"])])
    state["rm_pairs_per_s"] = {k: summary(v) for k, v in pps.items()}
    return {"rm_speedup_vs_trl": (ratios["median"], f"min {ratios['min']:.3f} max {ratios['max']:.3f} over "
                                  f"{ratios['n']} rounds; pairs/s finegrain {summary(pps['fg'])['median']:.1f}, "
                                  f"TRL {summary(pps['trl'])['median']:.1f}")}


@dataclass(frozen=True)
class RealSettings:
    """Sizes of the real-model arm (the same in --quick and full: it must fit in about 20 minutes).

    SmolLM2-135M is 25x the tiny GPT-2 and 30 layers deep: one PPO step of batch 8 x 32 response
    tokens with one update epoch takes 8-20 s on 2 cores, and a trial (loading four 135M models,
    two warm-up steps, two measured) 60-90 s. Two warm-up steps because the second step of both
    systems is still slower than the ones after it (memory touched for the first time after the
    optimizer's state exists). 8 PPO arms (full and LoRA, fp32 and bf16, two systems) x 2 rounds
    plus 2 x 2 reward-model trials is about 22 minutes.
    """

    rounds: int = 2
    ppo_steps: int = 4        # the first two are the warm-up
    warmup_steps: int = 2
    batch_size: int = 8
    response_length: int = 32
    ppo_epochs: int = 1
    num_minibatches: int = 1
    rm_pairs: int = 40        # 5 steps of 8 pairs; the first 2 are the warm-up
    rm_batch: int = 8
    rm_warmup_steps: int = 2
    lora: dict[str, Any] = field(default_factory=lambda: dict(REAL_LORA))  # common.REAL_LORA, for both sides


REAL = RealSettings()


def real_arms(r: RealSettings, before_after: bool | tuple[str, ...] = False,
              which: tuple[str, ...] = REAL_PPO_ARMS, variants: tuple[str, ...] = ()) -> dict[str, tuple[str, dict[str, Any]]]:
    """name -> (task, extra arguments): {fg, trl} x {full, lora} x {fp32, bf16} (+ the before/after arms).

    ``before_after``: the :data:`BEFORE_AFTER` paths (True: all of them) whose bf16 finegrain arms
    without the path run too; ``which``: the ``{tune}_{prec}`` settings to run (default all four);
    ``variants``: finegrain's bf16 arms also run in these :data:`REAL_VARIANTS` (``fg_{tune}_bf16_{variant}``,
    against the same TRL arm).
    """
    paths = tuple(BEFORE_AFTER) if before_after is True else tuple(before_after or ())
    arms = {}
    for tune in ("full", "lora"):
        for prec in ("fp32", "bf16"):
            if f"{tune}_{prec}" not in which:
                continue
            extra: dict[str, Any] = {}
            if prec == "bf16":
                extra["mixed_precision"] = "bf16"
            if tune == "lora":
                extra.update(use_lora=True, lora_r=r.lora["lora_r"], lora_alpha=r.lora["lora_alpha"],
                             lora_target_modules=list(r.lora["lora_target_modules"]))
            arms[f"fg_{tune}_{prec}"] = ("fg_ppo", dict(extra, reward_mode="sequence"))
            arms[f"trl_{tune}_{prec}"] = ("trl_ppo", extra)
            for variant in variants if prec == "bf16" else ():
                if variant == TRL_MATCHED:  # TRL given the rest of finegrain's bf16 setting (trl_side.run_ppo)
                    arms[f"trl_{tune}_{prec}_matched"] = ("trl_ppo", dict(extra, matched=True))
                    continue
                arms[f"fg_{tune}_{prec}_{variant}"] = ("fg_ppo", dict(extra, reward_mode="sequence",
                                                                      **REAL_VARIANTS[variant][0]))
            if prec == "bf16":  # finegrain without a speed path, in the same run
                for name in paths:
                    switches, tunes = BEFORE_AFTER[name]
                    if tune in tunes:
                        arms[f"fg_{tune}_{prec}_{name}"] = ("fg_ppo", dict(extra, reward_mode="sequence",
                                                                            speed=switches))
    return arms


# --real-variants: finegrain's bf16 arms again with these options -> (options, figure prefix, what it is)
REAL_VARIANTS = {
    "shared": ({"value_init": "shared"}, "real_shared_vs_trl",
               "finegrain --value-init shared (one backbone for policy and value: not the same algorithm)"),
    "weights": ({"param_dtype": "bf16"}, "real_bf16_weights_vs_trl",
                "finegrain --param-dtype bf16 (bf16 weights, fp32 master weights; the same algorithm)"),
}

# --real-variants trl_matched: TRL's bf16 arms again, given the rest of finegrain's bf16 setting (every rollout pass
# under autocast, eager attention, bf16 frozen models, freed memory kept), against finegrain's bf16 arms
TRL_MATCHED = "trl_matched"

# speed paths measured before/after on the real model (--real-before-after):
# arm suffix -> (switches off, the fine-tuning kinds the path acts in)
BEFORE_AFTER = {"no_frozen_low_precision": ({"frozen_low_precision": False}, ("full", "lora")),
                "no_merged_lora_sampling": ({"merge_lora_sampling": False}, ("lora",)),
                "no_heap_large_blocks": ({"heap_large_blocks": False}, ("full", "lora")),
                "no_sdpa_sampling": ({"sdpa_sampling": False}, ("full", "lora"))}


def bench_real(s: Settings, assets: Path, logs: Path, state: dict) -> dict[str, tuple[float, str]]:
    """SmolLM2-135M-Instruct: PPO (full and LoRA, fp32 and bf16) and reward-model training, finegrain against TRL.

    Per PPO arm: response tokens/s over the steps after the warm-up, and the trial process's peak
    RSS (the whole process: imports, four models, optimizer state, activations). Both systems
    load the same safetensors checkpoints (:func:`common.build_real_assets`).
    """
    r = REAL if not s.real_rounds else replace(REAL, rounds=s.real_rounds)
    real = assets.parent / "assets_real"
    try:
        build_in_child(f"build_real_assets({str(real)!r}, response_length={r.response_length})", logs, "assets_real")
    except BenchFailed as e:
        raise BenchFailed(f"{e} (the {REAL_POLICY} assets; scripts/install_models.sh installs the model)") from e
    kw = dict(steps=r.ppo_steps, batch_size=r.batch_size, response_length=r.response_length,
              ppo_epochs=r.ppo_epochs, num_minibatches=r.num_minibatches, **PPO_COMMON)
    arms = real_arms(r, s.real_before_after, tuple(a for a in s.real_arms if a != "rm"), s.real_variants)
    tps: dict[str, list[float]] = {k: [] for k in arms}
    rss: dict[str, list[float]] = {k: [] for k in arms}
    failed: dict[str, str] = {}
    state["real_settings"] = r.__dict__ | {"lora": r.lora | {"lora_target_modules": list(r.lora["lora_target_modules"])}}
    state["real_runs"] = []
    for rnd in range(r.rounds):
        for name in rotated(list(arms), rnd):
            if name in failed:
                continue
            task, extra = arms[name]
            try:
                res = worker(task, real, logs, f"real_{name}_{rnd}", **kw, **extra)
                tps[name].append(rate(res, res["response_tokens_per_step"], r.warmup_steps))
            except BenchFailed as e:
                failed[name] = str(e)
                log(f"  round {rnd} {name} failed: {e}")
                continue
            rss[name].append(res["peak_rss_gb"])
            state["real_runs"].append({"round": rnd, "name": name, **res})
            log(f"  round {rnd} {name}: {tps[name][-1]:.1f} response tokens/s, peak RSS {rss[name][-1]:.2f} GB "
                f"(the process, final save included: {res['process_peak_rss_gb']:.2f})")
    state["real_tokens_per_s"] = {k: summary(v) for k, v in tps.items()}
    state["real_peak_rss_gb"] = {k: summary(v) for k, v in rss.items()}

    def versus(a: str, b: str, what: str) -> tuple[float, str]:
        """Median over rounds of tokens/s(a) / tokens/s(b), with its spread, both medians and the RSS ratio."""
        if a in failed or b in failed:
            return math.nan, failed.get(a) or failed[b]
        sp, mem = (summary([x / y for x, y in zip(v[a], v[b])]) for v in (tps, rss))
        return sp["median"], (f"{what}, min {sp['min']:.3f} max {sp['max']:.3f} over {sp['n']} rounds: "
                              f"{summary(tps[a])['median']:.1f} / {summary(tps[b])['median']:.1f}; peak RSS "
                              f"{summary(rss[a])['median']:.2f} / {summary(rss[b])['median']:.2f} GB "
                              f"(ratio {mem['median']:.3f})")

    out: dict[str, tuple[float, str]] = {}
    for tune in ("full", "lora"):
        for prec in ("fp32", "bf16"):
            fg, trl = f"fg_{tune}_{prec}", f"trl_{tune}_{prec}"
            key = f"real_ppo_speedup_{tune}_{prec}"
            if fg not in arms:
                continue
            if fg in failed or trl in failed:
                out[key] = out[f"real_ppo_rss_ratio_{tune}_{prec}"] = (math.nan, failed.get(fg) or failed[trl])
                continue
            sp = summary([a / b for a, b in zip(tps[fg], tps[trl])])
            mem = summary([a / b for a, b in zip(rss[fg], rss[trl])])
            out[key] = (sp["median"], f"min {sp['min']:.3f} max {sp['max']:.3f} over {sp['n']} rounds; response "
                                      f"tokens/s finegrain {summary(tps[fg])['median']:.1f}, TRL "
                                      f"{summary(tps[trl])['median']:.1f}")
            out[f"real_ppo_rss_ratio_{tune}_{prec}"] = (
                mem["median"], f"peak RSS finegrain {summary(rss[fg])['median']:.2f} GB, TRL "
                               f"{summary(rss[trl])['median']:.2f} GB (median of {mem['n']} rounds)")
            for variant, (_, figure, what) in REAL_VARIANTS.items():
                if f"{fg}_{variant}" in arms:
                    out[f"{figure}_{tune}"] = versus(f"{fg}_{variant}", trl, f"{what} / TRL tokens/s")
            if f"{trl}_matched" in arms:
                out[f"real_ppo_speedup_{tune}_{prec}_vs_matched_trl"] = versus(
                    fg, f"{trl}_matched", "finegrain / TRL given finegrain's bf16 setting (every pass under autocast, "
                                          "eager attention, bf16 frozen models, freed memory kept) tokens/s")
            for suffix in s.real_before_after if prec == "bf16" else ():
                if f"{fg}_{suffix}" in arms:
                    out[f"real_gain_{suffix}_{tune}"] = versus(
                        fg, f"{fg}_{suffix}", f"finegrain {tune} bf16 tokens/s with the path / without it ({suffix})")
    if "rm" not in s.real_arms:
        return out
    kw_rm = dict(n_pairs=r.rm_pairs, batch_size=r.rm_batch, max_length=256, seed=0, learning_rate=1e-5)
    pps: dict[str, list[float]] = {"fg": [], "trl": []}
    try:
        for rnd in range(r.rounds):
            for name in rotated(list(pps), rnd):
                res = worker(f"{name}_rm", real, logs, f"real_rm_{name}_{rnd}", **kw_rm)
                pps[name].append(rate(res, res["pairs_per_step"], r.rm_warmup_steps))
                log(f"  round {rnd} rm {name}: {pps[name][-1]:.2f} pairs/s, peak RSS {res['peak_rss_gb']:.2f} GB")
        sm = summary([a / b for a, b in zip(pps["fg"], pps["trl"])])
        out["real_rm_speedup_vs_trl"] = (sm["median"], f"min {sm['min']:.3f} max {sm['max']:.3f} over {sm['n']} "
                                                       f"rounds (fp32); pairs/s finegrain "
                                                       f"{summary(pps['fg'])['median']:.2f}, TRL "
                                                       f"{summary(pps['trl'])['median']:.2f}")
    except BenchFailed as e:
        out["real_rm_speedup_vs_trl"] = (math.nan, str(e))
    state["real_rm_pairs_per_s"] = {k: summary(v) for k, v in pps.items()}
    return out


CURVE_PPO = {"tiny": dict(steps=4, ppo_epochs=4, num_minibatches=1, mixed_precision="bf16"),
             "smollm2": dict(steps=4, ppo_epochs=1, num_minibatches=1, mixed_precision="bf16")}  # as the real arm


def build_in_child(call: str, logs: Path, tag: str) -> None:
    """Run ``common.<call>`` in a child process (the driver never imports torch)."""
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import common; common.{call}"
    with open(logs / f"{tag}.log", "w") as f:
        p = subprocess.run([PY, "-c", code], stdout=f, stderr=subprocess.STDOUT)
    if p.returncode != 0:
        tail = (logs / f"{tag}.log").read_text().strip().splitlines()[-1:]
        raise BenchFailed(f"{tag} failed: " + " | ".join(tail))


def bench_curves(s: Settings, assets: Path, logs: Path, state: dict) -> dict[str, tuple[float, str]]:
    """PPO step time and peak RSS of both systems as the response length and the batch grow (curves.py).

    Tiny GPT-2 (built with 512 positions so that 256-token responses fit) at lengths 32-256 and
    batches 8-32, 4 PPO epochs; SmolLM2-135M at the few shapes the budget allows (one update
    epoch, as the real arm); the shapes are ``curves.SWEEPS``. bf16 autocast, both systems; one trial per system per point, the
    order alternating. Figures: each system's fitted growth exponent, and TRL's minus finegrain's
    (>= 0: finegrain grows no faster).
    """
    tiny = assets.parent / "assets_curves"
    build_in_child(f"build_assets({str(tiny)!r}, common.ModelSpec(n_positions=512))", logs, "assets_curves")
    real = assets.parent / "assets_real"
    if not (real / "spec.json").exists():
        build_in_child(f"build_real_assets({str(real)!r}, response_length={REAL.response_length})", logs,
                       "assets_real")
    rows: list[dict[str, Any]] = []
    state["curves"] = {"rows": rows, "settings": CURVE_PPO}
    failures: list[str] = []
    for i, pt in enumerate(curves.points()):
        where = tiny if pt.model == "tiny" else real
        policy = policy_with_length(where, pt.length)
        kw = dict(CURVE_PPO[pt.model], batch_size=pt.batch, response_length=pt.length, policy=policy, **PPO_COMMON)
        for system in rotated(["finegrain", "trl"], i):
            task = "fg_ppo" if system == "finegrain" else "trl_ppo"
            try:
                res = worker(task, where, logs, f"curve_{pt.tag}_{system}", **kw)
            except BenchFailed as e:
                failures.append(str(e))
                log(f"  {pt.tag} {system} failed: {e}")
                continue
            step = statistics.median(res["step_s"][curves.SWEEPS[pt.model].warmup_steps:])
            rows.append({"model": pt.model, "length": pt.length, "batch": pt.batch, "system": system,
                         "step_s": step, "peak_rss_gb": res["peak_rss_gb"], "all_step_s": res["step_s"]})
            log(f"  {pt.tag} {system}: {step:.2f} s/step, peak RSS {res['peak_rss_gb']:.2f} GB")
    if not rows:
        raise BenchFailed("; ".join(failures) or "no curve point ran")
    ex = curves.exponents(rows)
    state["curves"]["exponents"] = ex
    state["curves"]["table"] = curves.table(rows)
    if s.plot:
        curves.plot(rows, s.plot)
        log(f"  plot: {s.plot}")
    out: dict[str, tuple[float, str]] = {}
    for model in ("tiny", "smollm2"):
        for axis in ("length", "batch"):
            fg, trl = ex.get(f"{model}_{axis}_finegrain", math.nan), ex.get(f"{model}_{axis}_trl", math.nan)
            sizes = curves.fit_sizes(rows, model, axis)  # the sizes both systems measured
            out[f"curve_{model}_{axis}_exponent_gap"] = (
                trl - fg, f"step time ~ {axis}^k over {axis} {sizes}: k finegrain {fg:.3f}, TRL {trl:.3f}; "
                          "TRL's minus finegrain's (>= 0: finegrain grows no faster)"
                          + (f"; {len(failures)} trial(s) failed (logged), left out of both fits" if failures else ""))
    return out


def update_flops(query_width: int, peak: dict[str, Any], s: Settings) -> float:
    """FLOPs of one PPO update phase: epochs x (policy + value) forward+backward over the step's tokens.

    Per token 6 N + 12 L d T (PaLM appendix B), N = matmul parameters (token and position
    lookups excluded), T = the padded length the models process (query width + response
    length), tokens = batch x T (padding counted: it is computed). The policy's LM head runs on
    the response_length + 1 positions finegrain keeps (``logits_to_keep``), not on all T.
    With one minibatch per epoch, finegrain runs the first epoch's forward in the rollout
    (``reuses_rollout_forward``): the update phase then does that epoch's backward only, and the
    forward (a third of 6 N + 12 L d T) is not counted.
    """
    seq = int(query_width) + s.response_length
    head = peak["lm_head_params"]
    policy = seq * train_flops_per_token(peak["policy_matmul_params"] - head, peak["n_layer"], peak["n_embd"], seq)
    policy += (s.response_length + 1) * 6.0 * head
    value = seq * train_flops_per_token(peak["value_matmul_params"], peak["n_layer"], peak["n_embd"], seq)
    epochs = s.ppo_epochs - (1 / 3 if s.num_minibatches == 1 else 0)
    return epochs * s.batch_size * (policy + value)


def mfu_of(arm: str, which: str, s: Settings, peak: dict, state: dict) -> tuple[float, str]:
    """Median update-phase MFU of one finegrain arm's steps after the warm-up, against the ``which``
    ("fp32" or "bf16") matmul peak its own process probed around each step."""
    runs = [r for r in state.get("ppo_runs", []) if r["name"] == arm]
    if not runs:
        return math.nan, f"no {arm} PPO runs to read the update phase from"
    mfus, achieved, peaks = [], [], []
    for run in runs:
        if run["peak_dtype"] != which:
            raise BenchFailed(f"{arm} probed the {run['peak_dtype']} matmul peak, not the {which} one")
        probes = run["peak_after_step"]
        for i in range(s.warmup_steps, len(run["metrics"])):
            # the probes run just before and just after this step, in the same process
            local = max(p for p in (probes[i - 1], probes[i]) if p)
            flops = update_flops(run["query_widths"][i], peak, s) / run["metrics"][i]["time_update"]
            achieved.append(flops)
            peaks.append(local)
            mfus.append(flops / local)
    sm = summary(mfus)
    state.setdefault("mfu", {})[arm] = {"per_step": mfus, "achieved_flops": summary(achieved),
                                       "peaks": summary(peaks)}
    return sm["median"], (f"update-phase FLOP/s {summary(achieved)['median'] / 1e9:.1f} G / {which} matmul peak "
                          f"{summary(peaks)['median'] / 1e9:.0f} G (probed in the same process around each step; "
                          f"bf16 peak {peak['bf16_flops'] / 1e9:.0f} G, fp32 {peak['fp32_flops'] / 1e9:.0f} G in a "
                          f"separate probe); min {sm['min']:.3f} max {sm['max']:.3f} over {sm['n']} steps")


def bench_mfu(s: Settings, assets: Path, logs: Path, state: dict) -> dict[str, tuple[float, str]]:
    """ppo_mfu (fp32 arm, fp32 peak) and ppo_mfu_bf16 (bf16 arm, bf16 peak)."""
    if not state.get("ppo_runs"):
        raise BenchFailed("no finegrain PPO runs to read the update phase from (run the ppo benchmark too)")
    peak = worker("peak", assets, logs, "peak")
    state["peak"] = peak
    # each arm's update against the peak of its own precision, probed in its own process around each step
    return {"ppo_mfu": mfu_of("fg_seq", "fp32", s, peak, state),
            "ppo_mfu_bf16": mfu_of("fg_seq_bf16", "bf16", s, peak, state)}


def run_demo(out: Path, seed: int, quick: bool, logfile: Path, timeout: float) -> dict[str, Any]:
    """``finegrain demo`` (full or --quick) as a child process; wall time and that child's own peak RSS (wait4)."""
    cmd = [PY, "-m", "finegrain", "demo", "--out", str(out), "--seed", str(seed)] + (["--quick"] if quick else [])
    env = dict(os.environ, FINEGRAIN_PROGRESS="0")
    t0 = time.perf_counter()
    with open(logfile, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        deadline = t0 + timeout
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                p.kill()
                os.wait4(p.pid, 0)
                raise BenchFailed(f"finegrain demo --seed {seed} took longer than {timeout:.0f}s")
            time.sleep(0.2)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = logfile.read_text().strip().splitlines()[-3:]
        raise BenchFailed(f"finegrain demo --seed {seed} exited {code}: " + " | ".join(tail))
    return {"seed": seed, "wall_s": wall, "peak_rss_gb": ru.ru_maxrss * 1024 / 1e9,
            "metrics": json.loads((out / "metrics.json").read_text())}


def bench_demo(s: Settings, assets: Path, logs: Path, state: dict) -> dict[str, tuple[float, str]]:
    runs, errors = [], []
    for seed in range(s.demo_seeds):
        try:
            runs.append(run_demo(logs / f"demo_{seed}", seed, s.demo_quick, logs / f"demo_{seed}.log",
                                 timeout=3600 if not s.demo_quick else 900))
            log(f"  demo seed {seed}: {runs[-1]['wall_s']:.0f}s, {runs[-1]['peak_rss_gb']:.2f} GB")
        except BenchFailed as e:
            errors.append(str(e))
            log(f"  demo seed {seed} failed: {e}")
    if not runs:
        raise BenchFailed("; ".join(errors))
    state["demo"] = [{k: v for k, v in r.items() if k != "metrics"} for r in runs]
    walls = summary([r["wall_s"] for r in runs])
    out: dict[str, tuple[float, str]] = {
        "demo_peak_rss_gb": (max(r["peak_rss_gb"] for r in runs), f"max over {len(runs)} seeds"),
        "demo_wall_s": (walls["median"], f"median of {walls['n']} seeds, min {walls['min']:.0f} max {walls['max']:.0f}"
                        + (" (--quick)" if s.demo_quick else ""))}
    try:
        conv = convergence_summary([r["metrics"] for r in runs])
        state["convergence"] = conv
        out["convergence_step_ratio"] = (conv["median"], conv["note"])
    except (KeyError, ValueError) as e:
        out["convergence_step_ratio"] = (math.nan, f"cannot read the demo's gold-reward curves: {e}")
    if errors:
        out["demo_wall_s"] = (out["demo_wall_s"][0], out["demo_wall_s"][1] + f"; {len(errors)} seed(s) failed")
    return out


def bench_robust(s: Settings, assets: Path, logs: Path, state: dict) -> dict[str, tuple[float, str]]:
    """The sandbox figures over demo seeds fixed before their results were seen (robustness.py)."""
    full, quick = [], []
    for seed in ROBUST_SEEDS:
        for is_quick, bucket in ((True, quick), (False, full)):
            tag = f"robust_{'quick' if is_quick else 'full'}_{seed}"
            try:
                r = run_demo(logs / tag, seed, is_quick, logs / f"{tag}.log", timeout=900 if is_quick else 3600)
            except BenchFailed as e:
                log(f"  {tag} failed: {e}")
                continue
            log(f"  {tag}: {r['wall_s']:.0f}s")
            bucket.append(r["metrics"])
    if not full:
        raise BenchFailed("no full demo finished")
    state["robust"] = {"seeds": list(ROBUST_SEEDS), "n_full": len(full), "n_quick": len(quick)}
    return robustness_summary(full, quick)


BENCHES: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "ppo": (bench_ppo, ("ppo_speedup_vs_trl", "ppo_speedup_vs_trl_fp32", "token_vs_sequence_cost",
                        "shared_backbone_vs_trl", "bf16_weights_vs_trl", "ppo_speedup_vs_trl_matched")),
    "mfu": (bench_mfu, ("ppo_mfu", "ppo_mfu_bf16")),
    "rm": (bench_rm, ("rm_speedup_vs_trl",)),
    "curves": (bench_curves, tuple(f"curve_{m}_{a}_exponent_gap" for m in ("tiny", "smollm2")
                                   for a in ("length", "batch"))),
    "real": (bench_real, tuple(f"real_ppo_{what}_{tune}_{prec}" for tune in ("full", "lora") for prec in ("fp32", "bf16")
                               for what in ("speedup", "rss_ratio")) + ("real_rm_speedup_vs_trl",)),
    "demo": (bench_demo, ("demo_peak_rss_gb", "demo_wall_s", "convergence_step_ratio")),
    "robust": (bench_robust, ("robust_token_minus_edit_seq_gold", "robust_token_minus_edit_seq_winrate",
                              "robust_token_minus_baseline_gold", "robust_token_minus_baseline_winrate",
                              "robust_rm_accuracy_gap", "robust_response_auroc", "robust_convergence_step_ratio",
                              "newcomer_gold_rose")),
}


def probe_peaks(assets: Path, logs: Path, info: dict[str, Any], when: str) -> None:
    """The machine's square-matmul peaks (fp32, bf16; GFLOP/s, a worker process) into ``info["matmul_peak_gflops"]``.

    Probed at the start and the end of every run, so each figure it prints sits beside the peak of
    the machine it ran on (the machines change kind between runs: their bf16 peaks differ 2-3x).
    """
    try:
        p = worker("peak", assets, logs, f"peak_{when}")
        info.setdefault("matmul_peak_gflops", {})[when] = {"fp32": p["fp32_flops"] / 1e9, "bf16": p["bf16_flops"] / 1e9}
        log(f"matmul peak at the {when}: fp32 {p['fp32_flops'] / 1e9:.0f}, bf16 {p['bf16_flops'] / 1e9:.0f} GFLOP/s")
    except BenchFailed as e:
        info.setdefault("matmul_peak_gflops", {})[when] = f"probe failed: {e}"


def build_assets(assets: Path, logs: Path, response_length: int) -> None:
    try:
        build_in_child(f"build_assets({str(assets)!r}, response_length={response_length})", logs, "assets")
    except BenchFailed as e:
        raise BenchFailed(f"building the benchmark models failed ({e}): see {logs / 'assets.log'}") from e


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes: <= 20 minutes on 2 CPU cores")
    ap.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHES)} (default: all; with --quick all "
                                   "but robust, which runs 5 full and 5 quick demos, about an hour, and real, "
                                   "SmolLM2-135M against TRL, about 20 minutes, and curves, about 20 minutes)")
    ap.add_argument("--rounds", type=int, help="override the number of alternating rounds")
    ap.add_argument("--precisions", default="no,bf16",
                    help="PPO arms to run: no (fp32) and/or bf16 autocast, each with both systems (default both)")
    ap.add_argument("--real-before-after", nargs="?", const=",".join(BEFORE_AFTER), default="",
                    help="the real arm also runs finegrain's bf16 arms with each newer speed path off (before/after "
                         f"in one run; about 4 minutes more per path); optionally only some of {','.join(BEFORE_AFTER)}")
    ap.add_argument("--real-arms", default=",".join(REAL_PPO_ARMS + ("rm",)),
                    help="what the real arm runs: any of full_fp32, full_bf16, lora_fp32, lora_bf16 (PPO, both "
                         "systems) and rm (reward-model training); default all")
    ap.add_argument("--real-variants", default="",
                    help="the real arm also runs finegrain's bf16 arms in these variants against the same TRL arms: "
                         + "; ".join(f"{k} = {v[2]}" for k, v in REAL_VARIANTS.items())
                         + f"; {TRL_MATCHED} = TRL's bf16 arms given the rest of finegrain's bf16 setting (every "
                           "rollout pass under autocast, eager attention, bf16 frozen models, freed memory kept)"
                         + " (comma-separated; about 3 minutes more each)")
    ap.add_argument("--threads", type=int, help="torch threads per worker (default: every core)")
    ap.add_argument("--json", type=Path, help="write every raw measurement here")
    ap.add_argument("--plot", type=Path, help="the curves benchmark draws its PNG here (also: python "
                                              "benchmarks/curves.py RUN.json OUT.png)")
    ap.add_argument("--workdir", type=Path, help="keep assets and logs here (default: a temporary directory)")
    args = ap.parse_args(argv)

    def listed(flag: str, allowed, *, empty_ok: bool = True) -> tuple[str, ...]:
        """The comma-separated values of ``flag``, each one of ``allowed`` (else one argparse error line)."""
        text = getattr(args, flag.lstrip("-").replace("-", "_"))
        values = tuple(v.strip() for v in text.split(",") if v.strip())
        if (not values and not empty_ok) or set(values) - set(allowed):
            ap.error(f"{flag} takes {', '.join(allowed)}, not {text!r}")
        return values

    s = replace(QUICK if args.quick else FULL, precisions=listed("--precisions", ("no", "bf16"), empty_ok=False))
    if args.rounds:
        s = replace(s, rounds=args.rounds, real_rounds=args.rounds)
    if args.plot:
        s = replace(s, plot=str(args.plot))
    s = replace(s, real_before_after=listed("--real-before-after", BEFORE_AFTER),
                real_arms=listed("--real-arms", REAL_PPO_ARMS + ("rm",), empty_ok=False),
                real_variants=listed("--real-variants", tuple(REAL_VARIANTS) + (TRL_MATCHED,)))
    if args.threads:
        os.environ["FINEGRAIN_BENCH_THREADS"] = str(args.threads)
    only = ([b.strip() for b in args.only.split(",") if b.strip()] if args.only else
            [b for b in BENCHES if not (args.quick and b in ("robust", "real", "curves"))])
    unknown = [b for b in only if b not in BENCHES]
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="finegrain-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    logs, assets = work / "logs", work / "assets"
    logs.mkdir(exist_ok=True)
    t_start = time.perf_counter()
    info = machine_info()
    info["worker_threads"] = int(os.environ.get("FINEGRAIN_BENCH_THREADS") or 0) or info["nproc"]
    log(f"machine: {info['nproc']} cpus, {info['cpu']}, torch {info.get('torch')}, load {info.get('loadavg_1m')}; "
        f"{info['worker_threads']} threads per worker; mode {'quick' if args.quick else 'full'}")
    state: dict[str, Any] = {"machine": info, "settings": s.__dict__, "command": " ".join(["benchmarks/run.py"] + (argv or sys.argv[1:]))}
    results: dict[str, tuple[float, str]] = {}
    try:
        build_assets(assets, logs, s.response_length)
    except BenchFailed as e:
        for b in only:
            for name in BENCHES[b][1]:
                results[name] = (math.nan, str(e))
        only = []
    if only:
        probe_peaks(assets, logs, info, "start")
    for b in only:
        fn, names = BENCHES[b]
        log(f"benchmark {b} ...")
        t0 = time.perf_counter()
        try:
            results.update(fn(s, assets, logs, state))
        except Exception as e:  # one failing benchmark must not stop the others
            reason = str(e) if isinstance(e, BenchFailed) else f"{type(e).__name__}: {e}"
            if not isinstance(e, BenchFailed):
                traceback.print_exc()
            for name in names:
                results.setdefault(name, (math.nan, reason))
        log(f"benchmark {b} done in {time.perf_counter() - t0:.0f}s")
    if only:
        probe_peaks(assets, logs, info, "end")
    state["results"] = {k: {"value": v, "note": n} for k, (v, n) in results.items()}
    state["total_s"] = time.perf_counter() - t_start
    if args.json:
        args.json.write_text(json.dumps(state, indent=1, default=str))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    log(f"total {state['total_s']:.0f}s")
    peaks = "; ".join(f"{when} fp32 {p['fp32']:.0f}, bf16 {p['bf16']:.0f}" if isinstance(p, dict) else f"{when} {p}"
                      for when, p in info.get("matmul_peak_gflops", {}).items())
    print(f"# machine: {info['cpu']}, {info['worker_threads']} threads per worker; matmul peak GFLOP/s: {peaks or 'not probed'}")
    for name, (value, note) in results.items():
        print(f"# {name}: {note}")
    for name, (value, _) in results.items():
        print(f"RESULT {name}={value:.4g}" if value == value else f"RESULT {name}=nan")
    return 0


if __name__ == "__main__":
    sys.exit(main())
