"""`finegrain demo`: the paper's three systems end to end in the simulated environment.

Stages (each writes the files of the matching CLI verb into ``OUT``, so any stage can be re-run
alone with that verb; a stage whose options match a completed run in ``OUT/stages/`` is reused):

1. ``sft``        sft/demos.jsonl -> sft/policy/                       (`finegrain sft --from-scratch`)
2. ``samples``    two SFT samples per prompt -> data/samples_{a,b}.jsonl (`finegrain generate`)
3. ``annotate``   noisy BT labels -> data/pairs.jsonl; gold-ordered held-out pairs -> data/heldout.jsonl
4. ``edit``       oracle edits of the rejected responses -> data/edits.jsonl (`finegrain edit --backend sandbox`)
5. ``rm``         rm/{seq_pref,seq_edit,token_edit,token_mean}/ + eval.json (`finegrain train-rm`, `eval-rm`)
6. ``ppo``        ppo/<system>-s<seed>/ with gold reward per step      (`finegrain ppo`)
7. ``eval``       eval/outputs/*.jsonl, eval/winrate/*.json vs the SFT policy (`finegrain generate`, `winrate`)
8. ``sweep``      (``--sweep``) every system over the same KL grid (token system: also reward-scale
                  variants), one seed, scored on validation prompts disjoint from the evaluation prompts
9. report         metrics.json, report.md, report.html, *.png
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..config import build_config, to_dict
from ..errors import InputError
from ..io import check_output_dir, exclusive_lock, iter_records, read_json, write_json, write_jsonl
from . import backends as _backends  # noqa: F401  registers backend "sandbox" (no installed entry point needed)
from .annotators import Annotator, calibrate_temperature
from .config import BACKBONE_SUFFIXES, TOKEN_LOSS_VARIANTS, DemoConfig
from .domain import ResponseStyle, gold_score, make_demonstrations, make_prompts

@dataclass(frozen=True)
class RMVariant:
    """One reward model of the demo: its data, loss and backbone (every variant gets the same pairs and epochs).

    backbone: ``policy`` (the SFT policy's decoder, causal), ``echo`` (the same decoder reading the
    response twice, so every token's reward sees the whole response) or ``encoder`` (a BERT of the
    policy's size built from scratch on the sandbox tokenizer).
    """

    pairs_file: str
    pairs: str
    loss: str
    backbone: str = "policy"
    label_weight: float = 0.0
    u0_weight: float = 0.0
    label: str = ""

    def options(self) -> dict:
        """`finegrain train-rm` options of this variant (besides data, sizes and seed)."""
        opts: dict = {"loss": self.loss, "pairs": self.pairs, "label_weight": self.label_weight,
                      "u0_weight": self.u0_weight}
        if self.backbone == "echo":
            opts["token_view"] = "echo"
        elif self.backbone == "encoder":
            opts["from_scratch"] = "encoder"
        return opts

    @property
    def kind(self) -> str:
        return "sequence" if self.loss == "sequence" else "token"


def _variants() -> dict[str, RMVariant]:
    """Every RM variant (backbone x loss) the demo can train; the RM sweep trains them all."""
    losses = {"token_edit": ("token_edit", 0.0, 0.0, "Eq. 4"), "token_mean": ("token_mean", 0.0, 0.0, "Eq. 1-3"),
              "token_edit_u0": ("token_edit", 0.0, 1.0, "Eq. 4 + U0 regulariser"),
              "token_label": ("token_label", 0.0, 0.0, "per-token labels from the edit"),
              "token_mean_label": ("token_mean", 1.0, 0.0, "Eq. 1-3 + per-token labels")}
    out: dict[str, RMVariant] = {}
    assert tuple(losses) == TOKEN_LOSS_VARIANTS
    what_of = {"policy": "SFT decoder", "echo": "SFT decoder, echo view", "encoder": "encoder from scratch"}
    for backbone, suffix in BACKBONE_SUFFIXES.items():
        what = what_of[backbone]
        out[f"seq_pref{suffix}"] = RMVariant("pairs.jsonl", "preference", "sequence", backbone if backbone != "echo"
                                             else "policy", label=f"sequence RM, original pairs ({what})")
        out[f"seq_edit{suffix}"] = RMVariant("edits.jsonl", "edit", "sequence", backbone if backbone != "echo"
                                             else "policy", label=f"sequence RM, edit pairs ({what})")
        for name, (loss, lw, uw, eq) in losses.items():
            out[f"{name}{suffix}"] = RMVariant("edits.jsonl", "edit", loss, backbone, lw, uw,
                                               f"token RM, edit pairs, {eq} ({what})")
    del out["seq_pref-echo"], out["seq_edit-echo"]  # a sequence score already sees the whole response
    return out


RM_VARIANTS = _variants()
MAIN_RMS = ("seq_pref", "seq_edit", "token_edit", "token_mean", "token_label")  # always trained (Table 2)
RM_SELECTION_RULE = ("among the token RM variants of the RM sweep, the highest accuracy on the validation pairs "
                     "(gold-ordered pairs of fresh SFT samples, never the evaluation pairs; their prompts recur among the 432 of "
                     "the sandbox); among "
                     "those within one standard error of it, the highest mean per-response AUROC against the gold "
                     "flawed tokens")
SYSTEMS = {  # name -> (reward model, PPO reward mode, label); the token RM is --token-rm
    "baseline": ("seq_pref", "sequence", "PPO-RLHF (original pairs + sequence RM)"),
    "edit_seq": ("seq_edit", "sequence", "Fine-grained PPO (edit data + sequence RM)"),
    "edit_token": ("token_edit", "token", "Fine-grained token-level PPO (edit data + token RM)"),
}
CURVE_KEYS = ("step", "gold_reward", "kl", "reward", "gold_flaw_rate", "response_length", "eos_rate")
FORMAT_VERSION = 2  # part of every stage key: bump when a stage's outputs change meaning
KL_GRID = (0.05, 0.2, 0.5, 1.0, 2.0, 5.0)  # KL coefficients the sweep tries for EVERY system (the selection grid)
TOKEN_EXTRA = [(None, 0.05, "raw"), (None, 0.2, "raw"), (None, 0.0, "mean"),  # None: the configured token RM
               ("token_edit", 1.0, "mean"), ("token_label", 0.5, "mean")]  # (token RM, KL, scale): shown, not selected
SELECTION_RULE = ("for each system, the KL coefficient of the grid with the highest win rate against the SFT policy on "
                  "the validation prompts (one PPO seed; ties: the smaller KL); the validation prompts are disjoint "
                  "from the evaluation prompts of the main table")


def say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Stages:
    """Runs named stages once per set of options; completed ones are recorded in OUT/stages/NAME.json."""

    def __init__(self, out: Path):
        self.out = out
        self.times: dict[str, float] = {}  # elapsed seconds of each stage (as first run, when reused)
        self.n_reused = 0

    def run(self, name: str, key: dict, fn: Callable[[], dict], clean: list[Path] = ()) -> dict:
        marker = self.out / "stages" / f"{name}.json"
        key = dict(key)
        if marker.exists():
            rec = read_json(marker)
            if not isinstance(rec, dict) or not isinstance(rec.get("result"), dict):
                raise InputError("not a stage record (a JSON object with a result): delete it to run the stage "
                                 "again", path=marker)
            if rec.get("key") == key:
                say(f"{name}: reusing the completed stage in {self.out}")
                self.n_reused += 1
                self.times[name] = rec.get("elapsed_s", 0.0)
                return rec["result"]
        marker.unlink(missing_ok=True)  # from here the stage is not complete, whatever an interruption leaves
        for p in clean:  # outputs of an older run with other options (or of one killed mid-stage)
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        say(f"{name}: running")
        t0 = time.time()
        result = fn()
        elapsed = time.time() - t0
        self.times[name] = elapsed
        write_json(marker, {"key": key, "result": result, "elapsed_s": elapsed, "digest": _digest(key)})
        say(f"{name}: done in {elapsed:.1f}s")
        return result


# ------------------------------------------------------------------------------------------- stats helpers
def gold_stats(prompts: list[str], responses: list[str]) -> dict[str, float]:
    """Mean gold reward, fraction of responses with a flaw, flaws per response, coverage of the item."""
    scores = [gold_score(p, r) for p, r in zip(prompts, responses)]
    n = max(len(scores), 1)
    return {"gold_reward": sum(s.reward for s in scores) / n,
            "flaw_rate": sum(bool(s.flaws) for s in scores) / n,
            "flaws_per_response": sum(len(s.flaws) for s in scores) / n,
            "item_coverage": sum(s.item > 0 for s in scores) / n,
            "length_ok": sum(s.length > 0 for s in scores) / n}


def is_mixed(prompt: str, response: str) -> bool:
    """True when a response has both a flaw and a good contribution (an item, a content sentence)."""
    g = gold_score(prompt, response)
    return bool(g.flaws) and (g.helpful > 0 or g.item > 0)


def flaw_kinds(prompts: list[str], responses: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p, r in zip(prompts, responses):
        for f in gold_score(p, r).flaws:
            out[f.kind] = out.get(f.kind, 0) + 1
    return dict(sorted(out.items()))


def valid_text(text: str) -> bool:
    """Usable as a response in a pairs file (non-empty, no control characters: the pair loader's rule)."""
    from ..data.loaders import check_text

    try:
        check_text(text, "response")
    except InputError:
        return False
    return True


def read_outputs(path: Path) -> tuple[list[str], list[str]]:
    rows = [r for _, r in iter_records(str(path))]
    return [r["prompt"] for r in rows], [r["output"] for r in rows]


def write_prompts(path: Path, prompts: list[str], prefix: str) -> None:
    write_jsonl(path, ({"id": f"{prefix}{i}", "prompt": p} for i, p in enumerate(prompts)))


# ------------------------------------------------------------------------------------------- stages
def stage_sft(cfg: DemoConfig, out: Path) -> dict:
    from ..sft.config import SFTConfig
    from ..sft.train import train_sft

    demos = make_demonstrations(cfg.size("n_demos"), cfg.seed, ResponseStyle(flaw_rate=cfg.flaw_rate))
    write_jsonl(out / "sft" / "demos.jsonl", demos)
    sft_cfg = build_config(SFTConfig, {
        "data": str(out / "sft" / "demos.jsonl"), "output": str(out / "sft" / "policy"), "from_scratch": True,
        "vocab_size": cfg.vocab_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": 2, "n_positions": 160,
        "epochs": cfg.size("sft_epochs"), "batch_size": cfg.sft_batch_size, "lr": cfg.sft_lr, "warmup_ratio": 0.05,
        "max_length": 160, "seed": cfg.seed, "log_with": "none"})
    summary = train_sft(sft_cfg)
    demo_stats = gold_stats([d["prompt"] for d in demos], [d["response"] for d in demos])
    return {"train": summary, "demonstrations": demo_stats, "n_demos": len(demos)}


def _generate(model: str, prompts: Path, output: Path, seed: int, temperature: float, cfg: DemoConfig,
              generator: str) -> dict:
    from ..eval.generate import GenerateConfig, generate

    return generate(build_config(GenerateConfig, {
        "model": model, "prompts": str(prompts), "output": str(output), "generator": generator, "batch_size": 64,
        "max_new_tokens": cfg.max_new_tokens, "temperature": temperature, "seed": seed, "device": "cpu"}))


def stage_samples(cfg: DemoConfig, out: Path) -> dict:
    data, policy = out / "data", str(out / "sft" / "policy")
    write_prompts(data / "rm_prompts.jsonl", make_prompts(cfg.size("n_rm_prompts"), cfg.seed * 7 + 1), "rm")
    write_prompts(data / "heldout_prompts.jsonl", make_prompts(cfg.size("n_heldout_prompts"), cfg.seed * 7 + 2), "ho")
    write_prompts(data / "rmval_prompts.jsonl", make_prompts(cfg.size("n_heldout_prompts"), cfg.seed * 7 + 6), "rv")
    for split in ("rm", "heldout", "rmval"):
        for side, k in (("a", 1), ("b", 2)):
            _generate(policy, data / f"{split}_prompts.jsonl", data / f"{split}_samples_{side}.jsonl",
                      cfg.seed * 1000 + k, cfg.sample_temperature, cfg, "sft")
    prompts, a = read_outputs(data / "rm_samples_a.jsonl")
    _, b = read_outputs(data / "rm_samples_b.jsonl")
    return {"sft_samples": gold_stats(prompts + prompts, a + b), "flaw_kinds": flaw_kinds(prompts + prompts, a + b)}


def stage_annotate(cfg: DemoConfig, out: Path) -> dict:
    """Noisy BT labels on the RM pairs (T calibrated on them to the configured noise); gold-ordered held-out pairs."""
    data = out / "data"
    prompts, a = read_outputs(data / "rm_samples_a.jsonl")
    _, b = read_outputs(data / "rm_samples_b.jsonl")
    keep = [i for i in range(len(prompts)) if valid_text(a[i]) and valid_text(b[i]) and a[i] != b[i]]
    rewards = [(gold_score(prompts[i], a[i]).reward, gold_score(prompts[i], b[i]).reward) for i in keep]
    temperature = calibrate_temperature([ra - rb for ra, rb in rewards], cfg.noise)
    ann = Annotator(noise=cfg.noise, seed=cfg.seed, temperature=temperature)
    rows, disagree, decided, mixed = [], 0, 0, 0
    for i, (ra, rb) in zip(keep, rewards):
        mixed += is_mixed(prompts[i], a[i]) and is_mixed(prompts[i], b[i])
        first, _, _ = ann.prefers_first(f"rm{i}", prompts[i], a[i], b[i])
        first = bool(first) if first is not None else True
        chosen, rejected = (a[i], b[i]) if first else (b[i], a[i])
        rc, rr = (ra, rb) if first else (rb, ra)
        if ra != rb:
            decided += 1
            disagree += rc < rr
        rows.append({"id": f"rm{i}", "prompt": prompts[i], "chosen": chosen, "rejected": rejected,
                     "gold_chosen": rc, "gold_rejected": rr})
    write_jsonl(data / "pairs.jsonl", rows)
    held, hp = gold_ordered_pairs(data, "heldout", "ho")  # Table 2's evaluation pairs
    val, _ = gold_ordered_pairs(data, "rmval", "rv")      # the RM sweep's validation pairs
    return {"n_val_pairs": len(val), "n_pairs": len(rows), "n_dropped_identical_or_invalid": len(prompts) - len(keep), "bt_temperature": temperature,
            "noise_target": cfg.noise, "observed_disagreement": disagree / max(decided, 1), "n_decided": decided,
            "both_mixed_fraction": mixed / max(len(rows), 1),
            "n_gold_ties": len(rows) - decided, "n_heldout_pairs": len(held),
            "n_heldout_dropped_ties_or_invalid": len(hp) - len(held)}


def gold_ordered_pairs(data: Path, split: str, prefix: str) -> tuple[list[dict], list[str]]:
    """Pairs of the split's two SFT samples per prompt, the gold-better one as `edited` (the edit format carries
    gold_spans of the worse one); gold ties and invalid texts dropped. Written to data/<split>.jsonl."""
    hp, ha = read_outputs(data / f"{split}_samples_a.jsonl")
    _, hb = read_outputs(data / f"{split}_samples_b.jsonl")
    rows = []
    for i, (p, x, y) in enumerate(zip(hp, ha, hb)):
        gx, gy = gold_score(p, x), gold_score(p, y)
        if gx.reward == gy.reward or not valid_text(x) or not valid_text(y):
            continue
        (better, worse, gw) = (x, y, gy) if gx.reward > gy.reward else (y, x, gx)
        rows.append({"id": f"{prefix}{i}", "prompt": p, "edited": better, "rejected": worse,
                     "gold_spans": [list(s) for s in gw.flawed_spans],
                     "edit_meta": {"note": "not an edit: two SFT samples ordered by the gold reward"}})
    write_jsonl(data / f"{split}.jsonl", rows)
    return rows, hp


def stage_edit(cfg: DemoConfig, out: Path) -> dict:
    from ..edit.core import EditConfig, edit_pairs

    data = out / "data"
    summary = edit_pairs(build_config(EditConfig, {
        "data": str(data / "pairs.jsonl"), "output": str(data / "edits.jsonl"), "backend": "sandbox",
        "model": "oracle", "max_edit_ratio": 1.0, "cache": "none"}))
    rows = [r for _, r in iter_records(str(data / "edits.jsonl"))]
    gains = []
    for r in rows:  # gold flawed spans of the rejected response, as a top-level field of the edited pair
        r["gold_spans"] = [list(s) for s in gold_score(r["prompt"], r["rejected"]).flawed_spans]
        gains.append(gold_score(r["prompt"], r["edited"]).reward - gold_score(r["prompt"], r["rejected"]).reward)
    write_jsonl(data / "edits.jsonl", rows)
    return {"n_pairs": summary["n_pairs"], "n_edited": summary["n_edited"], "n_rejected": summary["n_rejected"],
            "rejects_by_reason": summary["rejects_by_reason"], "edit_ratio": summary["edit_ratio"],
            "mean_gold_gain": sum(gains) / max(len(gains), 1), "min_gold_gain": min(gains, default=None)}


RM_EVAL_KEYS = ("accuracy", "accuracy_se", "n_pairs", "token_auroc", "token_auroc_source", "response_auroc",
                "response_auroc_n", "span_precision", "span_recall", "span_f1", "token_f1", "better_flagged_rate",
                "worse_flagged_rate", "flaw_threshold")


def stage_rm(cfg: DemoConfig, out: Path, name: str) -> dict:
    """Train RM variant ``name`` (10 % of its pairs held out to keep the best evaluation), then score it on the
    evaluation pairs (Table 2) and on the validation pairs (the RM sweep's selection)."""
    from ..rm.config import EvalRMConfig, TrainRMConfig
    from ..rm.evaluate import evaluate_reward_model
    from ..rm.train import train_reward_model

    v = RM_VARIANTS[name]
    rm_dir = out / "rm" / name
    t0 = time.time()
    train = train_reward_model(build_config(TrainRMConfig, {
        "data": str(out / "data" / v.pairs_file), "model": str(out / "sft" / "policy"), "output": str(rm_dir),
        **v.options(), "eval_fraction": 0.1, "eval_every": 20, "epochs": cfg.size("rm_epochs"), "batch_size": 16,
        "lr": cfg.rm_lr, "max_length": 160, "seed": cfg.seed, "log_with": "none",
        "save_every": 0}))
    train_s = time.time() - t0
    res = {"label": v.label, "kind": v.kind, "backbone": v.backbone,
           "train": {k: train.get(k) for k in ("n_train", "n_eval", "steps", "kept_step", "final_loss",
                                               "n_dropped_unchanged")},
           "train_s": train_s, "train_s_per_step": train_s / max(train.get("steps") or 1, 1)}
    for split, prefix in (("heldout", ""), ("rmval", "val_")):
        ev = evaluate_reward_model(build_config(EvalRMConfig, {
            "model": str(rm_dir), "data": str(out / "data" / f"{split}.jsonl"),
            "output": str(rm_dir / f"eval_{split}.json"), "pairs": "edit", "batch_size": 64}))
        res.update({prefix + k: ev.get(k) for k in RM_EVAL_KEYS})
    return res


def select_token_rm(rms: dict[str, dict]) -> str | None:
    """RM_SELECTION_RULE over the token variants of ``rms`` (validation figures only)."""
    token = {k: v for k, v in rms.items() if v["kind"] == "token" and v.get("val_accuracy") is not None}
    if not token:
        return None
    top = max(token.values(), key=lambda v: v["val_accuracy"])
    near = [k for k, v in token.items() if v["val_accuracy"] >= top["val_accuracy"] - (top["val_accuracy_se"] or 0)]
    return max(near, key=lambda k: (token[k].get("val_response_auroc") or 0.0, -list(RM_VARIANTS).index(k)))


def ppo_config(cfg: DemoConfig, out: Path, rm: str, mode: str, seed: int, run_dir: Path, *, kl: float, scale: str):
    from ..ppo.config import PPOConfig

    bs = cfg.size("ppo_batch_size")
    return build_config(PPOConfig, {
        "policy": str(out / "sft" / "policy"), "reward_model": str(out / "rm" / rm), "reward_mode": mode,
        "prompts": str(out / "ppo" / "prompts.jsonl"), "output": str(run_dir), "steps": cfg.size("ppo_steps"),
        "seed": seed, "batch_size": bs, "num_minibatches": 2, "ppo_epochs": 4, "forward_batch_size": bs,
        "lr": cfg.ppo_lr, "kl_coef": kl, "token_reward_scale": scale, **sequence_term(cfg, out, mode),
        "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.eval_temperature, "save_every": cfg.size("ppo_steps"),
        "sample_every": max(1, cfg.size("ppo_steps") // 4), "num_samples": 2, "log_with": "none",
        "missing_eos_penalty": 1.0,
        # a value model must not see the future: an encoder RM cannot initialise it
        "value_init": "policy" if RM_VARIANTS[rm].backbone == "encoder" else "reward"})


def sequence_term(cfg: DemoConfig, out: Path, mode: str) -> dict:
    """PPO options adding seq_edit's standardised score to the token system's rewards (--token-sequence-coef)."""
    if mode != "token" or not cfg.token_sequence_coef:
        return {}
    return {"sequence_reward_model": str(out / "rm" / "seq_edit"), "sequence_reward_coef": cfg.token_sequence_coef}


def gold_on_rollout(step: int, prompts: list[str], responses: list[str]) -> dict[str, float]:
    s = gold_stats(prompts, responses)
    return {"gold_reward": s["gold_reward"], "gold_flaw_rate": s["flaw_rate"],
            "gold_flaws_per_response": s["flaws_per_response"]}


def stage_ppo(cfg: DemoConfig, out: Path, run_dir: Path, rm: str, mode: str, seed: int, *, kl: float,
              scale: str) -> dict:
    from ..ppo import train_ppo

    t0 = time.time()
    summary = train_ppo(ppo_config(cfg, out, rm, mode, seed, run_dir, kl=kl, scale=scale), on_rollout=gold_on_rollout)
    elapsed = time.time() - t0
    lines = [r for _, r in iter_records(str(run_dir / "metrics.jsonl"))]
    return {"final_policy": summary["final_policy"], "wall_s": elapsed, "s_per_step": elapsed / max(len(lines), 1),
            "curve": {k: [r.get(k) for r in lines] for k in CURVE_KEYS}}


SPLITS = {"eval": ("prompts.jsonl", "outputs", "winrate"),  # split -> (prompts file, outputs dir, win-rate dir) in OUT/eval
          "val": ("val_prompts.jsonl", "val_outputs", "val_winrate")}


def validation_prompts(cfg: DemoConfig, eval_prompts: list[str]) -> tuple[list[str], int]:
    """(distinct sandbox prompts NOT in ``eval_prompts``, passes): ``passes`` samples per prompt give at least
    ``n_val_prompts`` comparisons (the win-rate judge takes each prompt once per file, so passes are separate files)."""
    used = set(eval_prompts)
    rest = [p for p in make_prompts(432, cfg.seed * 7 + 5, unique=True) if p not in used]
    n = cfg.size("n_val_prompts")
    prompts = rest[:n]
    return prompts, math.ceil(n / len(prompts))


def _eval_pass(cfg: DemoConfig, out: Path, name: str, ref: str, model: str, seed: int, gen_seed: int,
               split: str) -> dict:
    """One set of outputs of ``model`` on the split's prompts, their gold statistics and win rate against ``ref``."""
    from ..eval.winrate import WinrateConfig, winrate

    ev = out / "eval"
    prompts_file, out_dir, wr_dir = SPLITS[split]
    outputs = ev / out_dir / f"{name}.jsonl"
    _generate(model, ev / prompts_file, outputs, gen_seed, cfg.eval_temperature, cfg, name)
    prompts, texts = read_outputs(outputs)
    res = {"gold": gold_stats(prompts, texts)}
    if name != ref:
        wr = winrate(build_config(WinrateConfig, {
            "outputs": str(outputs), "reference": str(ev / out_dir / f"{ref}.jsonl"), "judge": "sandbox",
            "output": str(ev / wr_dir / f"{name}.json"), "cache": "none", "seed": seed,
            "backend_options": {"noise": cfg.judge_noise, "seed": seed}}))
        res.update(win_rate=wr["win_rate"], se=wr["se"], n=wr["n"])
        annotations = read_json(ev / wr_dir / f"{name}.annotations.json")  # per prompt, in the prompts' order
        res["scores"] = [None if a["preference"] is None else a["preference"] - 1.0 for a in annotations]
    return res


# The SFT reference samples from a stream of its own: PPO run k of demo seed s samples its evaluation outputs with
# seed 10,000 + 100 s + k, so the reference (10,000 + s before) shared PPO seed 0's stream in demo seed 0, and the
# two outputs of a comparison started alike (a coupled comparison, pulled towards a tie).
REFERENCE_STREAM = 5_000_000


def generation_seed(name: str, seed: int, pass_index: int = 0) -> int:
    """The sampling seed of evaluation outputs: the SFT reference's own stream, another for each PPO run (by seed)."""
    return (REFERENCE_STREAM if name == "sft" else 10_000) + seed + 1_000 * pass_index


def pooled_win_rate(passes: list[list[float | None]]) -> dict[str, float]:
    """Win rate and SE of several passes over the SAME prompts: each prompt's mean score over its judged passes,
    then the mean and the standard error over prompts (the passes share the prompts, so their errors are not
    independent: combining the passes' SEs as if they were understates it)."""
    from ..eval.winrate import winrate_stats

    per_prompt = [sum(judged) / len(judged) for scores in zip(*passes)
                  if (judged := [s for s in scores if s is not None])]
    stats = winrate_stats([1.0 + x for x in per_prompt])  # as preferences: 1 + score, in [1, 2]
    return {"win_rate": stats["win_rate"], "se": stats["se"], "n_prompts": stats["n"]}


def stage_eval(cfg: DemoConfig, out: Path, name: str, model: str, seed: int, split: str = "eval",
               passes: int = 1) -> dict:
    """Outputs of ``model`` on the split's prompts (``passes`` samples each), gold statistics, win rate vs SFT.

    With several passes, pass j compares ``name-pj`` with ``sft-pj`` on the same prompts; the result
    averages the passes, with the win rate's SE over prompts (:func:`pooled_win_rate`).
    """
    if passes == 1:
        res = _eval_pass(cfg, out, name, "sft", model, seed, generation_seed(name, seed), split)
        res.pop("scores", None)
        return res
    res = [_eval_pass(cfg, out, f"{name}-p{j}", f"sft-p{j}", model, seed, generation_seed(name, seed, j), split)
           for j in range(passes)]
    merged: dict[str, Any] = {"gold": {k: sum(r["gold"][k] for r in res) / passes for k in res[0]["gold"]}}
    if "win_rate" in res[0]:
        pooled = pooled_win_rate([r["scores"] for r in res])
        merged.update(win_rate=pooled["win_rate"], se=pooled["se"], n=sum(r["n"] for r in res))
    return merged


# ------------------------------------------------------------------------------------------- the run
def _keys(cfg: DemoConfig) -> dict[str, dict]:
    """Options each stage depends on (its own and its inputs'), for reuse decisions."""
    s = cfg.size
    k: dict[str, dict] = {}
    k["sft"] = {"version": FORMAT_VERSION, "seed": cfg.seed, "flaw_rate": cfg.flaw_rate, "n_demos": s("n_demos"), "epochs": s("sft_epochs"),
                "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "vocab": cfg.vocab_size, "lr": cfg.sft_lr,
                "batch": cfg.sft_batch_size}
    k["samples"] = {"sft": k["sft"], "n": s("n_rm_prompts"), "n_heldout": s("n_heldout_prompts"),
                    "temperature": cfg.sample_temperature, "max_new_tokens": cfg.max_new_tokens}
    k["annotate"] = {"samples": k["samples"], "noise": cfg.noise}
    k["edit"] = {"annotate": k["annotate"]}
    k["rm"] = {"edit": k["edit"], "epochs": s("rm_epochs"), "lr": cfg.rm_lr, "version": 2}
    # options shared by every PPO run; a run adds its own KL (and, token reward, RM and scale): see run_key
    k["ppo"] = {"rm": k["rm"], "steps": s("ppo_steps"), "batch": s("ppo_batch_size"), "n_prompts": s("n_ppo_prompts"),
                "lr": cfg.ppo_lr, "temperature": cfg.eval_temperature}
    # of every evaluated output; streams 2: the SFT reference samples from a stream of its own (REFERENCE_STREAM)
    sampling = {"temperature": cfg.eval_temperature, "max_new_tokens": cfg.max_new_tokens, "streams": 2}
    k["eval"] = {"n": s("n_eval_prompts"), "judge_noise": cfg.judge_noise, **sampling}
    k["val"] = {"n_val": s("n_val_prompts"), "n_eval": s("n_eval_prompts"), "judge_noise": cfg.judge_noise, **sampling}
    return k


def system_setting(cfg: DemoConfig, sysname: str) -> tuple[str, str, float, str]:
    """(reward model, reward mode, KL coefficient, token-reward scale) of a system's main runs under ``cfg``."""
    rm, mode, _ = SYSTEMS[sysname]
    if mode == "token":
        return cfg.token_rm, mode, cfg.token_kl_coef, cfg.token_reward_scale
    return rm, mode, getattr(cfg, f"{sysname}_kl_coef"), "mean"  # the scale is unused by sequence rewards


def run_name(sysname: str, rm: str, kl: float, scale: str, k: int, seq_coef: float = 0.0) -> str:
    """Name (stage and directory) of one PPO run, from its settings: the main table and the sweep share equal runs."""
    extra = ""
    if SYSTEMS[sysname][1] == "token":
        extra = ("" if scale == "mean" else f"-{scale}") + f"-{rm}" + (f"-seq{seq_coef:g}" if seq_coef else "")
    return f"{sysname}-kl{kl:g}{extra}-s{k}"


def run_key(keys: dict, rm: str, mode: str, kl: float, scale: str, seed: int, seq_coef: float = 0.0) -> dict:
    """Options one PPO run depends on (for reuse decisions)."""
    key = {**keys["ppo"], "kl": kl, "seed": seed}
    if mode == "token":
        key.update(rm_name=rm, scale=scale)
        if seq_coef:  # (absent when 0, so the runs made before the option keep their keys)
            key["sequence_coef"] = seq_coef
    return key


def ppo_run(cfg: DemoConfig, out: Path, st: Stages, keys: dict, sysname: str, rm: str, kl: float, scale: str,
            k: int) -> tuple[str, dict, dict]:
    """Run (or reuse) PPO seed ``k`` of a system with the given settings; (name, key, PPO result)."""
    mode, seed = SYSTEMS[sysname][1], cfg.seed * 100 + k
    name = run_name(sysname, rm, kl, scale, k, cfg.token_sequence_coef)
    key, run_dir = run_key(keys, rm, mode, kl, scale, seed, cfg.token_sequence_coef), out / "ppo" / name
    ppo = st.run(f"ppo_{name}", key, lambda: stage_ppo(cfg, out, run_dir, rm, mode, seed, kl=kl, scale=scale),
                 [run_dir])
    # the recorded path names the directory the run was made in: a run moved or copied since would evaluate
    # that directory's policy (or fail when it is gone), not its own
    return name, key, dict(ppo, final_policy=str(run_dir / "final"))


def run_demo(cfg: DemoConfig) -> dict:
    """Run (or resume) the whole demo in ``cfg.out``; returns the metrics also written to metrics.json.

    Runs on ``cfg.threads`` torch threads and gives the caller its own thread count back. Holds a lock on
    ``cfg.out`` meanwhile: a second demo there would delete and rewrite the stages this one is running.
    """
    import torch

    out = Path(cfg.out)
    check_output_dir(out, what="--out")  # a file there: one error line, not mkdir's traceback
    threads = torch.get_num_threads()
    with exclusive_lock(out / ".lock", str(out)):
        torch.set_num_threads(cfg.threads)
        try:
            return _run_demo(cfg)
        finally:
            torch.set_num_threads(threads)


def _run_demo(cfg: DemoConfig) -> dict:
    from .report import write_report

    t_start = time.time()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    st, keys = Stages(out), _keys(cfg)
    m: dict[str, Any] = {"config": to_dict(cfg), "sizes": {n: cfg.size(n) for n in
                                                          ("n_demos", "sft_epochs", "n_rm_prompts",
                                                           "n_heldout_prompts", "rm_epochs", "n_ppo_prompts",
                                                           "ppo_steps", "ppo_batch_size", "ppo_seeds",
                                                           "n_eval_prompts")}}
    m["sft"] = st.run("sft", keys["sft"], lambda: stage_sft(cfg, out), [out / "sft"])
    m["samples"] = st.run("samples", keys["samples"], lambda: stage_samples(cfg, out))
    m["annotate"] = st.run("annotate", keys["annotate"], lambda: stage_annotate(cfg, out))
    m["edit"] = st.run("edit", keys["edit"], lambda: stage_edit(cfg, out))
    rm_names = list(RM_VARIANTS) if cfg.rm_sweep else list(dict.fromkeys(MAIN_RMS + (cfg.token_rm,)))
    m["rm"] = {n: st.run(f"rm_{n}", keys["rm"], lambda n=n: stage_rm(cfg, out, n), [out / "rm" / n])
               for n in rm_names}
    if cfg.rm_sweep:
        m["rm_sweep"] = {"rule": RM_SELECTION_RULE, "picked": select_token_rm(m["rm"]), "configured": cfg.token_rm}
    write_prompts(out / "ppo" / "prompts.jsonl", make_prompts(cfg.size("n_ppo_prompts"), cfg.seed * 7 + 3), "ppo")
    eval_prompts = make_prompts(cfg.size("n_eval_prompts"), cfg.seed * 7 + 4, unique=True)
    write_prompts(out / "eval" / "prompts.jsonl", eval_prompts, "ev")
    m["eval_sft"] = st.run("eval_sft", {"sft": keys["sft"], **keys["eval"]},
                           lambda: stage_eval(cfg, out, "sft", str(out / "sft" / "policy"), cfg.seed))
    m["systems"] = {}
    for sysname, (_, mode, label) in SYSTEMS.items():
        rm, _, kl, scale = system_setting(cfg, sysname)
        runs = []
        for k in range(cfg.size("ppo_seeds")):
            name, key, ppo = ppo_run(cfg, out, st, keys, sysname, rm, kl, scale, k)
            ev = st.run(f"eval_{name}", {**key, **keys["eval"]},
                        lambda: stage_eval(cfg, out, name, ppo["final_policy"], key["seed"]))
            runs.append({"name": name, "seed": key["seed"], "ppo": ppo, "eval": ev})
        if mode == "token" and cfg.token_sequence_coef:
            label = label[:-1] + f" + seq_edit x {cfg.token_sequence_coef:g} at the end)"
        m["systems"][sysname] = {"label": label, "reward_model": rm, "reward_mode": mode, "kl_coef": kl,
                                 "scale": scale if mode == "token" else None, "runs": runs, **aggregate(runs)}
    if cfg.sweep:
        m["sweep"] = run_sweep(cfg, out, st, keys, eval_prompts)
    m["timings_s"] = dict(st.times, total=time.time() - t_start, stages_sum=sum(st.times.values()),
                          n_reused=st.n_reused)
    m["peak_rss_mb"] = peak_rss_mb()
    write_json(out / "metrics.json", m)
    write_report(out, m)
    say(f"report written: {out / 'report.md'}, {out / 'report.html'}")
    return {"out": str(out), "metrics": str(out / "metrics.json"), "report": str(out / "report.md"),
            **{f"win_rate_{k}": v["win_rate"] for k, v in m["systems"].items()},
            **{f"rm_accuracy_{k}": v["accuracy"] for k, v in m["rm"].items()},
            "sft_flaw_rate": m["samples"]["sft_samples"]["flaw_rate"], "wall_s": round(m["timings_s"]["total"], 1)}


def aggregate(runs: list[dict]) -> dict[str, float]:
    """Win rate and gold reward over seeds: mean, and SE = std over seeds / sqrt(k) (k > 1) or the judge's SE (k = 1).

    The gold reward of one seed has no SE: None, not NaN (metrics.json must stay JSON).
    """
    wr = [r["eval"]["win_rate"] for r in runs]
    gold = [r["eval"]["gold"]["gold_reward"] for r in runs]
    k = len(runs)

    def se(xs: list[float]) -> float | None:
        if k < 2:
            return None
        mu = sum(xs) / k
        return math.sqrt(sum((x - mu) ** 2 for x in xs) / (k - 1) / k)

    judge_se = math.sqrt(sum(r["eval"]["se"] ** 2 for r in runs)) / k
    return {"win_rate": sum(wr) / k, "win_rate_se": se(wr) if k > 1 else judge_se, "win_rate_judge_se": judge_se,
            "gold_reward": sum(gold) / k, "gold_reward_se": se(gold),
            "flaw_rate": sum(r["eval"]["gold"]["flaw_rate"] for r in runs) / k}


def sweep_points(cfg: DemoConfig) -> list[tuple[str, str, float, str, bool]]:
    """(system, reward model, KL, scale, in the selection grid?) of every sweep run, without duplicates."""
    pts = []
    for sysname in SYSTEMS:
        rm, _, _, scale = system_setting(cfg, sysname)
        pts += [(sysname, rm, kl, scale, True) for kl in KL_GRID]
    pts += [("edit_token", rm or cfg.token_rm, kl, scale, False) for rm, kl, scale in TOKEN_EXTRA]
    seen, unique = set(), []
    for p in pts:
        if p[:4] not in seen:
            seen.add(p[:4])
            unique.append(p)
    return unique


def select_best(rows: list[dict]) -> dict[str, float]:
    """SELECTION_RULE: per system, the grid KL with the highest validation win rate (ties: the smaller KL)."""
    best: dict[str, dict] = {}
    for r in sorted((r for r in rows if r["grid"]), key=lambda r: r["kl_coef"]):
        if r["system"] not in best or r["val_win_rate"] > best[r["system"]]["val_win_rate"]:
            best[r["system"]] = r
    return {k: v["kl_coef"] for k, v in best.items()}


def run_sweep(cfg: DemoConfig, out: Path, st: Stages, keys: dict, eval_prompts: list[str]) -> dict:
    """Every sweep point (PPO seed 0) scored on the validation prompts; the per-system pick by SELECTION_RULE."""
    val_prompts, passes = validation_prompts(cfg, eval_prompts)
    write_prompts(out / "eval" / "val_prompts.jsonl", val_prompts, "va")
    st.run("val_sft", {"sft": keys["sft"], **keys["val"]},
           lambda: stage_eval(cfg, out, "sft", str(out / "sft" / "policy"), cfg.seed, split="val", passes=passes))
    rows = []
    for sysname, rm, kl, scale, grid in sweep_points(cfg):
        name, key, ppo = ppo_run(cfg, out, st, keys, sysname, rm, kl, scale, 0)
        ev = st.run(f"val_{name}", {**key, **keys["val"]},
                    lambda: stage_eval(cfg, out, name, ppo["final_policy"], key["seed"], split="val", passes=passes))
        rows.append({"system": sysname, "reward_model": rm, "kl_coef": kl,
                     "scale": scale if SYSTEMS[sysname][1] == "token" else None, "grid": grid,
                     "val_win_rate": ev["win_rate"], "val_se": ev["se"], "val_gold_reward": ev["gold"]["gold_reward"],
                     "val_flaw_rate": ev["gold"]["flaw_rate"], "final_kl": ppo["curve"]["kl"][-1]})
    best = select_best(rows)
    configured = {k: system_setting(cfg, k)[2] for k in SYSTEMS}
    return {"rows": rows, "best_kl": best, "configured_kl": configured, "rule": SELECTION_RULE,
            "grid": list(KL_GRID), "n_val_prompts": len(val_prompts), "val_passes": passes}


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
