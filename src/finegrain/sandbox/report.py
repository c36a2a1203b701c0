"""The demo's report: report.md, report.html (escaped text, PNG plots, a token-reward heat map) from metrics.json.

Everything shown is read from the metrics dict the demo recorded; the comparison with the
paper is stated from the measured numbers, whichever way they fall.
"""
from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from ..io import atomic_write

PAPER_TABLE1 = {"edit_token": "51.6 ± 1.8", "edit_seq": "51.2 ± 1.8", "baseline": "46.5 ± 1.8"}
PAPER_TABLE2 = {"seq_pref": "58.2 ± 1.8 (without fine-grained data)", "token_edit": "85.2 ± 1.8 (with fine-grained data)"}
PAPER_TABLE3_RM = {"seq_pref": "0.2 h (standard)", "token_edit": "0.3 h (fine-grained)"}
PAPER_TABLE3_PPO = {"baseline": "4 h", "edit_seq": "—", "edit_token": "2 h"}


def rm_label(m: dict, name: str) -> str:
    """How the report names a reward model: its variant's description and name."""
    return f"{m['rm'][name].get('label') or name} [{name}]"


def token_rm_name(m: dict) -> str:
    """The token RM the token-reward system used."""
    return m["systems"]["edit_token"]["reward_model"]


def fmt(x: Any, nd: int = 3, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{100 * x:.1f}" if pct else f"{x:.{nd}f}"


def kl_text(kl: Any) -> str:
    """A KL coefficient as given (``--token-kl-coef 0.025`` is 0.025, not 0.03 rounded to two decimals)."""
    return "n/a" if kl is None else f"{kl:g}"


def pm(x: Any, se: Any, pct: bool = False, nd: int = 3) -> str:
    if se is None or (isinstance(se, float) and not math.isfinite(se)):
        return fmt(x, nd, pct)
    return f"{fmt(x, nd, pct)} ± {fmt(se, nd, pct)}"


# ------------------------------------------------------------------------------------------- numbers
def mean_curve(runs: list[dict], key: str) -> tuple[list[int], list[float]]:
    """Step-wise mean over seeds of a PPO metric (steps where every seed has a value)."""
    curves = [r["ppo"]["curve"] for r in runs]
    steps = curves[0]["step"]
    ys = []
    for i in range(len(steps)):
        vals = [c[key][i] for c in curves if i < len(c[key]) and c[key][i] is not None]
        ys.append(sum(vals) / len(vals) if vals else float("nan"))
    return steps, ys


SMOOTH = 5  # window of the running means in plots and speed measurements


def running_mean(ys: list[float], window: int = SMOOTH) -> list[float]:
    """Trailing running mean: element i averages ys[max(0, i - window + 1) .. i]."""
    return [sum(ys[max(0, i - window + 1):i + 1]) / len(ys[max(0, i - window + 1):i + 1]) for i in range(len(ys))]


def steps_to_fraction(steps: list[int], ys: list[float], frac: float = 0.9, window: int = SMOOTH) -> int | None:
    """First step whose running mean (``window`` steps) has gained ``frac`` of the FINAL running-mean gain.

    None when the run ends no better than it started (a policy that improved and then collapsed
    has no speed worth reporting).
    """
    if not ys:
        return None
    sm = running_mean(ys, window)
    gain = sm[-1] - sm[0]
    if gain <= 0:
        return None
    return next(s for s, v in zip(steps, sm) if v - sm[0] >= frac * gain)


def steps_to_level(steps: list[int], ys: list[float], level: float, window: int = SMOOTH) -> int | None:
    """First step whose running mean (``window`` steps) reaches ``level``; None if it never does."""
    return next((st for st, v in zip(steps, running_mean(ys, window)) if v >= level), None)


def baseline_level(m: dict) -> float:
    """The baseline system's final running-mean gold reward of rollouts: the bar for the speed comparison."""
    return running_mean(mean_curve(m["systems"]["baseline"]["runs"], "gold_reward")[1])[-1]


def findings(m: dict) -> list[str]:
    """Plain statements of how the measured numbers compare with the paper's claims."""
    s, rm = m["systems"], m["rm"]
    out = []
    order, tied = win_rate_order(s)
    paper_order = ["edit_token", "edit_seq", "baseline"]
    out.append(f"Win-rate order measured: {order} (paper: {' > '.join(paper_order)}); "
               + ("the same order as the paper." if order == " > ".join(paper_order) else
                  "NOT the paper's order (equal win rates)." if tied else "NOT the paper's order."))
    for other in ("baseline", "edit_seq"):
        out.append(difference_line(s, other))
    tok = token_rm_name(m)
    a_seq, a_tok = rm["seq_pref"]["accuracy"], rm[tok]["accuracy"]
    line = (f"RM accuracy on held-out gold-ordered pairs: baseline sequence RM {100 * a_seq:.1f}%, the token "
            f"system's token RM ({tok}) {100 * a_tok:.1f}% (paper: 58.2% vs 85.2%); "
            + ("fine-grained data helps, as in the paper" if a_tok > a_seq else
               "the token RM is NOT more accurate here, unlike the paper"))
    ses = [rm[k].get("accuracy_se") for k in ("seq_pref", tok)]
    if all(v is not None and math.isfinite(v) for v in ses):
        se = math.sqrt(sum(v ** 2 for v in ses))  # the same pairs for both: a conservative SE of the gap
        gap = a_tok - a_seq
        line += (f" ({100 * gap:+.1f} ± {100 * se:.1f} points: "
                 + ("beyond two standard errors)." if abs(gap) > 2 * se and se > 0 else
                    "within two standard errors, not a clear difference)."))
    else:
        line += "."
    out.append(line)
    out += localisation_findings(m)
    if m.get("rm_sweep"):
        out.append(rm_sweep_finding(m))
    for k, v in s.items():
        _, length = mean_curve(v["runs"], "response_length")
        _, eos = mean_curve(v["runs"], "eos_rate")
        if length and length[0] and running_mean(length)[-1] > 1.5 * length[0]:
            out.append(f"{k}: responses grew from {length[0]:.0f} to {running_mean(length)[-1]:.0f} tokens (EOS rate "
                       f"{running_mean(eos)[-1]:.2f}) while the gold reward went from {fmt(mean_curve(v['runs'], 'gold_reward')[1][0])} "
                       f"to {fmt(v['gold_reward'])}: the policy is paid for length, i.e. it exploits its reward model.")
    out += tuning_findings(m)
    level = baseline_level(m)
    speed = {k: steps_to_level(*mean_curve(s[k]["runs"], "gold_reward"), level) for k in s}
    if speed["edit_token"] is not None and speed["baseline"] is not None:
        faster = speed["edit_token"] <= speed["baseline"] / 2
        out.append(f"Speed: the baseline's final gold reward ({level:.3f}, {SMOOTH}-step running mean of rollouts) is "
                   f"first reached at step {speed['edit_token']} by token-level PPO, {speed['edit_seq'] or 'never'} by "
                   f"edit-data sequence PPO and {speed['baseline']} by the baseline (paper: token-level PPO reaches its "
                   "best in half the time); " + ("at least twice as fast, as in the paper." if faster else
                                                 "NOT twice as fast here."))
    else:
        out.append("Token-level PPO never reached the baseline's final gold reward, so it was not faster.")
    return out


def win_rate_order(s: dict) -> tuple[str, bool]:
    """("a > b = c", any ties?): systems by win rate, best first; equal win rates are joined by '=', not put in
    an order (their dict order) that was never measured."""
    order = sorted(s, key=lambda k: -s[k]["win_rate"])
    text = order[0]
    for prev, k in zip(order, order[1:]):
        text += (" = " if s[k]["win_rate"] == s[prev]["win_rate"] else " > ") + k
    return text, " = " in text


def localisation_findings(m: dict) -> list[str]:
    """Does a low token reward point at the flawed tokens? One line per token RM of the main table."""
    out = []
    for k, v in m["rm"].items():
        if v.get("response_auroc") is None or k not in ("token_edit", "token_mean", token_rm_name(m)):
            continue
        out.append(f"Localisation of {k}: within a flawed response the gold flawed tokens get the lower reward with "
                   f"AUROC {fmt(v['response_auroc'])} (mean over {v.get('response_auroc_n')} responses; pooled over "
                   f"all tokens {fmt(v.get('token_auroc'))}); below its flaw threshold it finds "
                   f"{fmt(v.get('span_recall'), pct=True)}% of the flawed spans with span precision "
                   f"{fmt(v.get('span_precision'), pct=True)}% (F1 {fmt(v.get('span_f1'))}), and calls "
                   f"{fmt(v.get('better_flagged_rate'), pct=True)}% of the better response's tokens flawed.")
    return out


def rm_sweep_finding(m: dict) -> str:
    sw = m["rm_sweep"]
    pick, used = sw["picked"], token_rm_name(m)
    v = m["rm"].get(pick, {})
    return (f"RM sweep: by the rule ({sw['rule']}) the pick is {pick} (validation accuracy "
            f"{fmt(v.get('val_accuracy'), pct=True)}%, response AUROC {fmt(v.get('val_response_auroc'))}); "
            + (f"this run's token system uses it." if pick == used else
               f"this run's token system uses {used} (--token-rm), not the pick."))


def win_rate_se(system: dict) -> float:
    """A system's win-rate SE as the report gives it: the larger of the SE over PPO seeds (a rough estimate from
    few seeds, and blind to the judge and the reference outputs every seed shares) and the judge's SE."""
    return max(system["win_rate_se"] or 0, system.get("win_rate_judge_se") or 0)


def difference_line(s: dict, other: str) -> str:
    """Token-level PPO minus ``other`` in win rate and gold reward, each with a conservative SE.

    Win rate: per system the larger of the SE over seeds and the judge's SE (few seeds make the
    former a rough estimate); gold reward (noise-free): the SE over seeds.
    """
    t, o = s["edit_token"], s[other]
    gap = t["win_rate"] - o["win_rate"]
    se = math.sqrt(sum(win_rate_se(x) ** 2 for x in (t, o)))
    line = (f"Token-level PPO minus {other}: win rate {100 * gap:+.1f} points (± {100 * se:.1f}, the larger of seed and "
            "judge SE per system); " + ("beyond two standard errors" if abs(gap) > 2 * se and se > 0 else
                                        "within two standard errors: not a clear difference at this budget"))
    ses = [x.get("gold_reward_se") for x in (t, o)]
    if all(v is not None and math.isfinite(v) for v in ses):
        g, gse = t["gold_reward"] - o["gold_reward"], math.sqrt(sum(v ** 2 for v in ses))
        line += (f"; gold reward {g:+.3f} (± {gse:.3f}, SE over seeds; the gold reward has no judge noise): "
                 + ("beyond two standard errors." if abs(g) > 2 * gse and gse > 0 else "within two standard errors."))
    else:
        line += "."
    return line


def tuning_findings(m: dict) -> list[str]:
    """How each system's KL coefficient was chosen, and whether this run uses the sweep's picks."""
    s, sw = m["systems"], m.get("sweep")
    used = ", ".join(f"{k} {s[k]['kl_coef']:g}" for k in s)
    if not sw:
        return [f"Tuning: KL coefficients of this run: {used} ("
                + ("the demo defaults, each system's pick of an earlier `finegrain demo --sweep` on the full preset"
                   if uses_default_kl(m["config"]) else "not all the demo defaults")
                + "; run with --sweep to re-measure the choice)."]
    val = {(r["system"], r["kl_coef"]): r for r in sw["rows"] if r["grid"]}
    picks = ", ".join(f"{k} {kl:g} ({fmt(val[(k, kl)]['val_win_rate'], pct=True)}%)" for k, kl in sw["best_kl"].items())
    same = all(s[k]["kl_coef"] == kl for k, kl in sw["best_kl"].items())
    out = [f"Tuning: every system was swept over the same KL grid {sw['grid']} with one PPO seed; rule: "
           f"{sw['rule']}. Picks (validation win rate): {picks}. This run uses {used}: "
           + ("each system at its own pick, so the main table compares equally tuned systems." if same else
              "NOT every system at its pick, so the main table does not compare equally tuned systems.")]
    margins = []
    for k, kl in sw["best_kl"].items():
        others = sorted((r for (sk, _), r in val.items() if sk == k and r["kl_coef"] != kl),
                        key=lambda r: -r["val_win_rate"])
        if others:
            best, nxt = val[(k, kl)], others[0]
            se = math.sqrt(best["val_se"] ** 2 + nxt["val_se"] ** 2)
            margins.append(f"{k} {100 * (best['val_win_rate'] - nxt['val_win_rate']):+.1f} ± {100 * se:.1f} over KL "
                           f"{nxt['kl_coef']:g}")
    if margins:
        out.append("Margin of each pick over its runner-up on validation (one seed; the SE counts the judge and the "
                   f"prompts, not the PPO seed): {'; '.join(margins)}. Margins within two SEs mean the pick is one of "
                   "several equally good settings, not a sharp optimum.")
    edge = [k for k, kl in sw["best_kl"].items() if kl == max(sw["grid"])]
    if edge:
        out.append(f"The pick of {', '.join(edge)} is the largest KL of the grid: a larger one might do better still.")
    out.append(f"Validation: {sw['n_val_prompts']} sandbox prompts not among the evaluation prompts, "
               f"{sw['val_passes']} sample(s) each. Seed 0 of each picked setting is also seed 0 of the main table (selected "
               "on validation prompts, measured on evaluation prompts); the other seeds are fresh.")
    return out


# ------------------------------------------------------------------------------------------- plots
def write_plots(out: Path, m: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for key, ylabel, fname in (("gold_reward", "gold reward of rollouts", "ppo_gold_reward.png"),
                               ("kl", "KL(policy || SFT) per response", "ppo_kl.png")):
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
        for (sysname, sysm), colour in zip(m["systems"].items(), ("#1f77b4", "#ff7f0e", "#2ca02c")):
            steps, ys = mean_curve(sysm["runs"], key)
            ax.plot(steps, ys, color=colour, alpha=0.25, lw=1)
            ax.plot(steps, running_mean(ys), color=colour, lw=2, label=f"{sysname} ({sysm['reward_mode']} reward)")
        ax.set_title(f"mean over seeds (faint) and its {SMOOTH}-step running mean", fontsize=9)
        ax.set_xlabel("PPO step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        with atomic_write(out / fname, "wb") as f:
            fig.savefig(f, format="png")
        plt.close(fig)
        names.append(fname)
    rms = list(m["rm"])
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(rms)), 3.8), dpi=100)
    acc = [100 * m["rm"][k]["accuracy"] for k in rms]
    err = [100 * (m["rm"][k]["accuracy_se"] or 0) for k in rms]
    colours = ["#999" if m["rm"][k].get("kind") == "sequence" else "#2a7" for k in rms]
    ax.bar(range(len(rms)), acc, yerr=err, capsize=3, color=colours)
    auc = [(i, 100 * m["rm"][k]["response_auroc"]) for i, k in enumerate(rms) if m["rm"][k].get("response_auroc")]
    if auc:
        ax.plot([i for i, _ in auc], [a for _, a in auc], "kD", ms=5, label="per-response token AUROC x 100")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xticks(range(len(rms)), rms, rotation=35, ha="right", fontsize=8)
    ax.axhline(50, color="k", lw=0.8, ls=":")
    ax.set_ylabel("accuracy on held-out gold pairs (%)")
    ax.set_ylim(0, 100)
    fig.tight_layout()
    with atomic_write(out / "rm_accuracy.png", "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    names.append("rm_accuracy.png")
    return names


def write_heatmap(out: Path, rm: str, n: int = 3) -> str | None:
    """token_rewards.html: the token RM's per-token rewards on held-out pairs (`finegrain show-rewards`)."""
    from ..config import build_config
    from ..eval.show import ShowRewardsConfig, show_rewards

    rm_dir, data = out / "rm" / rm, out / "data" / "heldout.jsonl"
    if not (rm_dir / "finegrain.json").exists() or not data.exists():
        return None
    # held-out pairs are two independent samples, not an edit: no changed-token outlines
    show_rewards(build_config(ShowRewardsConfig, {"model": str(rm_dir), "data": str(data), "mark_changed": False,
                                                  "output": str(out / "token_rewards.html"), "n": n}))
    return "token_rewards.html"


# ------------------------------------------------------------------------------------------- tables
def tables(m: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of every results table, shared by the Markdown and HTML reports."""
    out = []
    rows = []
    for k, v in m["systems"].items():
        rows.append([v["label"], kl_text(v.get("kl_coef")), pm(v["win_rate"], win_rate_se(v), pct=True),
                     pm(v["gold_reward"], v.get("gold_reward_se")), fmt(v["flaw_rate"], pct=True),
                     PAPER_TABLE1[k]])
    sft = m["eval_sft"]["gold"]
    rows.append(["SFT policy (reference)", "—", "50.0", fmt(sft["gold_reward"]), fmt(sft["flaw_rate"], pct=True),
                 "Davinci003: 50.0"])
    out.append(("Table 1 analogue: win rate against the SFT policy (gold judge, noisy BT)",
                ["system", "KL coef", "win rate % (± SE: the larger of seed and judge SE)", "gold reward (± SE over "
                 "seeds)", "flawed responses %", "paper: win rate vs Davinci003"],
                rows))
    rows = [[rm_label(m, k), pm(v["accuracy"], v["accuracy_se"], pct=True), fmt(v.get("response_auroc")),
             fmt(v.get("token_auroc")), fmt(v.get("span_f1")), fmt(v.get("better_flagged_rate"), pct=True),
             PAPER_TABLE2.get(k, "—")] for k, v in m["rm"].items()]
    out.append(("Table 2 analogue: reward models on held-out gold-ordered pairs (equal data and epochs; localisation "
                "against the gold flawed tokens of the worse response)",
                ["reward model", "accuracy % (± SE)", "per-response AUROC", "pooled AUROC", "span F1",
                 "better response flagged %", "paper accuracy %"], rows))
    if m.get("rm_sweep"):
        pick = m["rm_sweep"]["picked"]
        rows = [[k, pm(v.get("val_accuracy"), v.get("val_accuracy_se"), pct=True), fmt(v.get("val_response_auroc")),
                 fmt(v.get("val_span_f1")), "picked" if k == pick else ""] for k, v in m["rm"].items()
                if v.get("kind") == "token"]
        out.append(("RM sweep: token RMs on the validation pairs (the selection; never the evaluation pairs)",
                    ["reward model", "val accuracy % (± SE)", "val per-response AUROC", "val span F1", "selection"],
                    rows))
    rows = [[f"RM: {rm_label(m, k)}", f"{v['train_s_per_step']:.3f} s/step", f"{v['train_s']:.1f} s total",
             PAPER_TABLE3_RM.get(k, "—")] for k, v in m["rm"].items()]
    for k, v in m["systems"].items():
        per = sum(r["ppo"]["s_per_step"] for r in v["runs"]) / len(v["runs"])
        steps, ys = mean_curve(v["runs"], "gold_reward")
        s90, reach = steps_to_fraction(steps, ys), steps_to_level(steps, ys, baseline_level(m))
        rows.append([f"PPO: {k}", f"{per:.2f} s/step", f"baseline's final gold reward reached at step "
                     f"{reach or 'never'}; 90% of own final gain at step {s90 or 'n/a (no gain)'}",
                     PAPER_TABLE3_PPO[k]])
    out.append(("Table 3 analogue: cost (this machine, CPU)", ["stage", "time per step", "total / speed",
                                                               "paper (8 x A100)"], rows))
    if m.get("sweep"):
        sw = m["sweep"]
        rows = [[r["system"], r["reward_model"], kl_text(r["kl_coef"]), r["scale"] or "—",
                 pm(r["val_win_rate"], r["val_se"], pct=True), fmt(r["val_gold_reward"]), fmt(r["val_flaw_rate"], pct=True),
                 fmt(r["final_kl"], 1), sweep_mark(r, sw)] for r in sw["rows"]]
        out.append(("Sweep (PPO seed 0; validation prompts, disjoint from the evaluation prompts)",
                    ["system", "reward model", "KL coef", "token-reward scale", "val win rate % (± SE)", "val gold reward",
                     "val flawed %", "final KL", "selection"], rows))
    return out


def sweep_mark(r: dict, sw: dict) -> str:
    """'picked' for a system's selected grid point, 'grid' for the others, 'extra' for rows outside the selection."""
    if not r["grid"]:
        return "extra (not selectable)"
    return "picked" if sw["best_kl"].get(r["system"]) == r["kl_coef"] else "grid"


def settings_line(m: dict) -> str:
    c = m["config"]
    return (f"PPO: {m['sizes']['ppo_steps']} steps of {m['sizes']['ppo_batch_size']} rollouts for every system "
            f"({m['sizes']['ppo_seeds']} seed(s) each), lr {c['ppo_lr']}; KL coefficient of the baseline "
            f"{c['baseline_kl_coef']}, of the edit-data sequence system {c['edit_seq_kl_coef']}; token-reward system: "
            f"RM {c.get('token_rm', 'token_edit')}, reward scale "
            f"{c['token_reward_scale']} (raw = r_t, mean = r_t / T, prefix = the change to the mean so far), "
            f"KL coefficient {c['token_kl_coef']}"
            + (f", plus seq_edit's standardised score x {c['token_sequence_coef']} at the last token "
               if c.get("token_sequence_coef") else " ")
            + ("(the demo defaults: each system's pick of an earlier sweep; this run's picks, if swept, in Findings)."
               if uses_default_kl(c) else "(not all the demo defaults; see Findings)."))


KL_OPTIONS = ("baseline_kl_coef", "edit_seq_kl_coef", "token_kl_coef")


def uses_default_kl(cfg: dict) -> bool:
    """Whether the run's KL coefficients (``cfg``: the demo config as recorded) are the demo's defaults."""
    from .config import DemoConfig

    defaults = DemoConfig()
    return all(cfg.get(k) == getattr(defaults, k) for k in KL_OPTIONS)


def environment_lines(m: dict) -> list[str]:
    d, s, a, e = m["sft"]["demonstrations"], m["samples"]["sft_samples"], m["annotate"], m["edit"]
    return [settings_line(m),
        f"Demonstrations: {m['sft']['n_demos']} (flaw rate per sentence {m['config']['flaw_rate']}): "
        f"{fmt(d['flaw_rate'], pct=True)}% of them have a flaw, mean gold reward {fmt(d['gold_reward'])}.",
        f"SFT policy samples: {fmt(s['flaw_rate'], pct=True)}% flawed, {fmt(s['flaws_per_response'], 2)} flaws per "
        f"response, mean gold reward {fmt(s['gold_reward'])}; flaw kinds {m['samples']['flaw_kinds']}.",
        f"Annotation: {a['n_pairs']} pairs, BT temperature {fmt(a['bt_temperature'])} calibrated to noise "
        f"{a['noise_target']}; observed disagreement with the gold order {fmt(a['observed_disagreement'], pct=True)}% "
        f"over {a['n_decided']} pairs with distinct gold rewards ({a['n_gold_ties']} gold ties); in "
        f"{fmt(a.get('both_mixed_fraction'), pct=True)}% of the pairs both responses mix good content and flaws.",
        f"Oracle edits: {e['n_edited']} of {e['n_pairs']} rejected responses edited ({e['n_rejected']} without a flaw: "
        f"{e['rejects_by_reason']}); mean gold gain {fmt(e['mean_gold_gain'])}, minimum {fmt(e['min_gold_gain'])}.",
        f"Held-out RM evaluation pairs: {a['n_heldout_pairs']} (two SFT samples ordered by the gold reward); "
        f"validation pairs for choosing among RM variants: {a.get('n_val_pairs')} (the same kind, other samples; their prompts recur among the sandbox's 432).",
        f"Wall time of this invocation {m['timings_s']['total']:.0f} s ({m['timings_s'].get('n_reused', 0)} stages "
        f"reused; all stages as first run: {m['timings_s'].get('stages_sum', m['timings_s']['total']):.0f} s), "
        f"peak RSS {m['peak_rss_mb']:.0f} MB.",
    ]


# ------------------------------------------------------------------------------------------- writers
SMOKE_NOTE = ("A --smoke run checks that every stage runs and writes its files; its sizes are far too small for any "
              "conclusion. Run `finegrain demo --quick` (or the full preset) for results.")

def command_line(cfg: dict) -> str:
    """The demo command of this run: its preset, seed and sweeps, then every other option that differs from its
    default (sizes and environment too: a command without them would make another run)."""
    import shlex
    from dataclasses import fields

    from .config import DemoConfig

    defaults = DemoConfig()
    first = ("out", "quick", "smoke", "seed", "sweep", "rm_sweep")
    names = ("baseline_kl_coef", "edit_seq_kl_coef", "token_kl_coef", "token_reward_scale", "token_sequence_coef",
             "token_rm")
    names += tuple(f.name for f in fields(DemoConfig) if f.name not in first + names)
    extra = "".join(f" --{k.replace('_', '-')}" + ("" if cfg[k] is True else f" {shlex.quote(str(cfg[k]))}")
                    for k in names if k in cfg and cfg[k] != getattr(defaults, k))
    return (f"finegrain demo --out {shlex.quote(str(cfg['out']))}" + (" --quick" if cfg["quick"] else "")
            + (" --smoke" if cfg.get("smoke") else "") + f" --seed {cfg['seed']}"
            + (" --sweep" if cfg.get("sweep") else "") + (" --rm-sweep" if cfg.get("rm_sweep") else "") + extra)


def markdown(m: dict, plots: list[str], heatmap: str | None) -> str:
    cfg = m["config"]
    cmd = command_line(cfg)
    lines = ["# finegrain demo: fine-grained RLHF in the simulated environment", "",
             f"Command: `{cmd}`  ", f"PPO seeds per system: {m['sizes']['ppo_seeds']}, "
             f"{m['sizes']['ppo_steps']} steps of {m['sizes']['ppo_batch_size']} rollouts each.", ""]
    if cfg.get("smoke"):
        lines += [f"> {SMOKE_NOTE}", ""]
    lines += ["## Environment", ""]
    lines += [f"- {x}" for x in environment_lines(m)]
    for title, header, rows in tables(m):
        lines += ["", f"## {title}", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "## Findings (from the numbers above)", ""] + [f"- {x}" for x in findings(m)]
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    if heatmap:
        lines += ["", f"Per-token rewards of the token RM on held-out pairs: [{heatmap}]({heatmap})"]
    return "\n".join(lines) + "\n"


def html_report(m: dict, plots: list[str], heatmap: str | None) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>finegrain demo report</title><style>"
             "body{font-family:system-ui,sans-serif;max-width:70em;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em}"
             "th{background:#f3f3f3}img{max-width:48%;margin:.5em}iframe{width:100%;height:40em;border:1px solid #ccc}"
             "</style></head><body><h1>finegrain demo: fine-grained RLHF in the simulated environment</h1>",
             (f"<p><b>{e(SMOKE_NOTE)}</b></p>" if m["config"].get("smoke") else ""),
             "<h2>Environment</h2><ul>" + "".join(f"<li>{e(x)}</li>" for x in environment_lines(m)) + "</ul>"]
    for title, header, rows in tables(m):
        parts.append(f"<h2>{e(title)}</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"
                     + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows) + "</table>")
    parts.append("<h2>Findings</h2><ul>" + "".join(f"<li>{e(x)}</li>" for x in findings(m)) + "</ul>")
    parts.append("<h2>Plots</h2>" + "".join(f"<img src='{e(p)}' alt='{e(p)}'>" for p in plots))
    ex = example_html(m)
    if ex:
        parts.append(ex)
    if heatmap:
        parts.append(f"<h2>Per-token rewards of the token RM</h2><p><a href='{e(heatmap)}'>{e(heatmap)}</a></p>"
                     f"<iframe src='{e(heatmap)}'></iframe>")
    parts.append("</body></html>\n")
    return "".join(parts)


def example_html(m: dict) -> str:
    """One evaluation prompt with the SFT output and each system's output (escaped), with gold rewards."""
    ex = m.get("example")
    if not ex:
        return ""
    e = html.escape
    rows = "".join(f"<tr><td>{e(k)}</td><td>{e(v['text'])}</td><td>{fmt(v['gold'])}</td></tr>"
                   for k, v in ex["outputs"].items())
    return (f"<h2>Example</h2><p><b>Prompt:</b> {e(ex['prompt'])}</p><table><tr><th>policy</th><th>output</th>"
            f"<th>gold reward</th></tr>{rows}</table>")


def attach_example(out: Path, m: dict) -> None:
    """Record the first evaluation prompt's outputs (SFT and each system's first seed) in ``m['example']``."""
    from ..io import iter_records
    from .domain import gold_reward

    files = {"sft": out / "eval" / "outputs" / "sft.jsonl"}
    files.update({k: out / "eval" / "outputs" / f"{v['runs'][0]['name']}.jsonl" for k, v in m["systems"].items()})
    outputs, prompt = {}, None
    for name, path in files.items():
        if not path.exists():
            continue
        rec = next(iter(iter_records(str(path))))[1]
        prompt = rec["prompt"]
        outputs[name] = {"text": rec["output"], "gold": gold_reward(rec["prompt"], rec["output"])}
    if prompt is not None:
        m["example"] = {"prompt": prompt, "outputs": outputs}


def write_report(out: Path, m: dict) -> dict[str, str]:
    """Write report.md, report.html, the PNG plots and token_rewards.html into ``out``."""
    attach_example(out, m)
    plots = write_plots(out, m)
    heatmap = write_heatmap(out, token_rm_name(m))
    with atomic_write(out / "report.md") as f:
        f.write(markdown(m, plots, heatmap))
    with atomic_write(out / "report.html") as f:
        f.write(html_report(m, plots, heatmap))
    return {"markdown": str(out / "report.md"), "html": str(out / "report.html")}
