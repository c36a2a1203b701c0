"""What each speed-up in finegrain's PPO step buys: switch one off, time the real step, switch it back.

``python benchmarks/whatif.py [--rounds N] [--variants a,b+c,...] [--mixed-precision bf16|no] [--param-dtype fp32|bf16]
[--real] [--use-lora]``

One process builds finegrain's own PPO engine (``preflight``, ``load_models``, ``build_engine``)
on the benchmark assets (``--real``: SmolLM2-135M-Instruct, the assets of ``run.py --only real``;
``--use-lora``: a LoRA policy, r 16 on q_proj and v_proj there, on c_attn on the tiny model), with every optimisation on (as ``finegrain ppo`` runs), then times its
real ``rollout_step`` and ``ppo_update`` again and again, switching one optimisation OFF between
calls (base, v1, v2, ..., order rotated every round). Interleaving single calls in one process is
what makes a 5 % effect visible on a noisy machine. Each figure is the median over rounds of
variant time / base time: how much faster the step is WITH the optimisation (> 1 = it helps).

Variants (``a+b`` switches several off at once). Each is a switch of `finegrain.speed` (set with
``speed.overrides``, the models brought in line by ``speed.apply_model_switches``), except the
attention kernel, a per-run option, switched with transformers' ``set_attn_implementation``:
- ``sdpa``: SDPA attention instead of the eager kernel ``--attn-implementation auto`` picks
  under CPU autocast (`finegrain.models.pick_attention`);
- ``gelu_new``: GPT-2's 8-op ``gelu_new`` instead of the one-kernel tanh GELU swapped in at load
  (``fuse_gelu=False``);
- ``full_logits``: the LM head on every position instead of the response's (``logits_to_keep=False``);
- ``unfused_adamw``: torch's per-tensor AdamW loop instead of ``fused=True`` (``fused_adamw=False``;
  a second optimizer over the same parameters, built under that switch);
- ``generate``: transformers' ``generate`` samples the rollouts instead of finegrain's decoding
  loop (``decoder="generate"``);
- ``inference_mode``: sampling under ``torch.inference_mode`` instead of ``no_grad``, where
  autocast does not cache its bf16 weight copies and casts every weight again for every token
  (``no_grad_sampling=False``);
- ``rollout_forward``: the rollout runs its own policy and value forward and the first update
  epoch runs it again, instead of backpropagating through the rollout's
  (``reuse_rollout_forward=False``; only with one minibatch per epoch, the default here);
- ``untrimmed``: minibatches keep the whole batch's padding (``trim_minibatches=False``);
  it only matters with several minibatches (``--num-minibatches``) or responses that end early;
- ``lora_unmerged``: a LoRA policy samples through its adapters instead of merged weights
  (``merge_lora_sampling=False``; only with ``--use-lora``);
- ``strided_head``: the LM head multiplies the strided slice of hidden states that ``logits_to_keep``
  hands it instead of a contiguous copy (``contiguous_head_input=False``; it matters for models held in
  bf16, ``--param-dtype bf16``, and in fp32).
- ``dynamic_cache``: sampling grows transformers' dynamic KV cache by concatenation at every token
  instead of writing into one allocated for the whole response (``preallocated_kv_cache=False``; it
  matters where the attention reads the cache's view as it is: SDPA, or grouped key/value heads).
- ``unpacked``: a bf16 policy samples through its plain weights, which oneDNN reorders in every product,
  instead of weights packed once per sampling call (``packed_sampling_weights=False``; CPUs with oneDNN's
  bf16 kernels).
- ``eager_sampling``: a policy whose eager attention ``auto`` chose (bf16 on a CPU) samples through it too,
  instead of through SDPA (``sdpa_sampling=False``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FINEGRAIN_PROGRESS", "0")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from common import REAL_LORA, build_assets, build_real_assets, set_threads  # noqa: E402
from fg_side import build_ppo_engine, ppo_config_values  # noqa: E402

DEFAULT = ("sdpa,gelu_new,full_logits,unfused_adamw,generate,inference_mode,rollout_forward,"
           "sdpa+gelu_new+full_logits+unfused_adamw+generate+inference_mode+rollout_forward")
# variant -> the finegrain.speed switch it turns off ("sdpa" is the attention option, not a speed switch)
SWITCHES = {"gelu_new": {"fuse_gelu": False}, "full_logits": {"logits_to_keep": False},
            "unfused_adamw": {"fused_adamw": False}, "generate": {"decoder": "generate"},
            "inference_mode": {"no_grad_sampling": False}, "rollout_forward": {"reuse_rollout_forward": False},
            "untrimmed": {"trim_minibatches": False}, "lora_unmerged": {"merge_lora_sampling": False},
            "strided_head": {"contiguous_head_input": False},
            "dynamic_cache": {"preallocated_kv_cache": False}, "unpacked": {"packed_sampling_weights": False},
            "eager_sampling": {"sdpa_sampling": False}}
VARIANTS = {"sdpa"} | set(SWITCHES)


class Switches:
    """Reversible ways to turn finegrain's optimisations off in a live PPO engine."""

    def __init__(self, engine):
        from finegrain import speed
        from finegrain.training import make_adamw

        unwrapped = engine.accelerator.unwrap_model(engine.model)
        self.models = [m for m in (unwrapped.policy, unwrapped.value_model, engine.ref_policy, engine.scorer.rm.model)
                       if m is not None]  # no reference model with LoRA (the adapters off)
        self.attn = {id(m): m.config._attn_implementation for m in self.models}
        groups = [{"params": g["params"], "lr": g["lr"]} for g in engine.optimizer.param_groups]
        self.base_opt = engine.optimizer
        with speed.overrides(fused_adamw=False):
            self.loop_opt = make_adamw(groups, eps=engine.cfg.adam_eps)

    @contextlib.contextmanager
    def on(self, variant: str):
        """Context in which the optimisations named by ``variant`` are off; yields the optimizer to use."""
        from finegrain import speed

        parts = set(filter(None, variant.split("+"))) - {"base"}
        if parts - VARIANTS:
            raise SystemExit(f"unknown variant(s) {sorted(parts - VARIANTS)}; known: {sorted(VARIANTS)}")
        off = {k: v for p in sorted(parts & set(SWITCHES)) for k, v in SWITCHES[p].items()}
        with contextlib.ExitStack() as stack:
            if "sdpa" in parts:
                for m in self.models:
                    m.set_attn_implementation("sdpa")
                stack.callback(lambda: [m.set_attn_implementation(self.attn[id(m)]) for m in self.models])
            # after the overrides end (callbacks run last in, first out): the models follow the switches again
            stack.callback(lambda: [speed.apply_model_switches(m) for m in self.models])
            stack.enter_context(speed.overrides(**off))
            for m in self.models:
                speed.apply_model_switches(m)
            yield self.loop_opt if "unfused_adamw" in parts else self.base_opt


def planned_steps(rounds: int, n_variants: int) -> int:
    """PPO steps the run takes: one warm-up step per variant, then one per variant per round. The config's
    ``steps`` must cover them all: the linear learning-rate schedule reaches 0 at ``steps`` and goes negative after.

    >>> planned_steps(6, 9)
    63
    """
    return (rounds + 1) * n_variants


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default=DEFAULT)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--response-length", type=int, default=32)
    ap.add_argument("--num-minibatches", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "finegrain-whatif")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--mixed-precision", default="bf16", choices=["bf16", "no"])
    ap.add_argument("--ppo-epochs", type=int, default=4)
    ap.add_argument("--param-dtype", default="fp32", choices=["fp32", "bf16"],
                    help="bf16: every model held in bf16, fp32 master weights (needs --mixed-precision bf16)")
    ap.add_argument("--real", action="store_true", help="SmolLM2-135M-Instruct instead of the tiny GPT-2 "
                                                        "(give --batch-size 8 --ppo-epochs 1 for the real arm's sizes)")
    ap.add_argument("--use-lora", action="store_true", help="a LoRA policy (r 16, alpha 32)")
    a = ap.parse_args()
    from finegrain.config import build_config
    from finegrain.ppo import PPOConfig
    from finegrain.ppo.train import ppo_update, rollout_step

    threads = set_threads()
    assets = a.workdir / ("assets_real" if a.real else "assets")
    if not (assets / "spec.json").exists():
        (build_real_assets if a.real else build_assets)(assets, response_length=a.response_length)
    variants = ["base"] + [v for v in a.variants.split(",") if v]
    steps = planned_steps(a.rounds, len(variants))
    values = ppo_config_values(
        assets, str(a.workdir / "run"), reward_mode="sequence", steps=steps, batch_size=a.batch_size,
        response_length=a.response_length, ppo_epochs=a.ppo_epochs, num_minibatches=a.num_minibatches, seed=0,
        learning_rate=1e-5, temperature=1.0, kl_coef=0.05) | {"mixed_precision": a.mixed_precision,
                                                                "param_dtype": a.param_dtype}
    if a.use_lora:
        values.update(REAL_LORA, use_lora=True,
                      lora_target_modules=list(REAL_LORA["lora_target_modules"]) if a.real else ["c_attn"])
    cfg = build_config(PPOConfig, values)
    e, acc = build_ppo_engine(cfg)
    sw = Switches(e)
    times: dict[str, dict[str, list[float]]] = {v: {"rollout": [], "update": []} for v in variants}
    step = 0
    for v in variants:  # warm-up: every variant once (fused kernels, autocast caches)
        with sw.on(v):
            r, _, attached = rollout_step(e, step)
        with sw.on(v) as opt:
            ppo_update(acc, e.model, opt, r, cfg, step, attached)
        step += 1
    for rnd in range(a.rounds):
        k = rnd % len(variants)
        for v in variants[k:] + variants[:k]:
            with sw.on(v):
                t0 = time.perf_counter()
                r, _, attached = rollout_step(e, step)
                t1 = time.perf_counter()
            with sw.on(v) as opt:
                t2 = time.perf_counter()
                ppo_update(acc, e.model, opt, r, cfg, step, attached)
                t3 = time.perf_counter()
            times[v]["rollout"].append(t1 - t0)
            times[v]["update"].append(t3 - t2)
            step += 1
    table = {}
    base = times["base"]
    print(f"threads {threads}; {'SmolLM2-135M' if a.real else 'tiny GPT-2'}{', LoRA' if a.use_lora else ''}; "
          f"B={a.batch_size}, Lr={a.response_length}, {a.ppo_epochs} PPO epochs of {a.num_minibatches} "
          f"minibatch(es), {a.rounds} interleaved rounds")
    print(f"finegrain --mixed-precision {a.mixed_precision} --param-dtype {a.param_dtype}; "
          "base = every optimisation on; variant = the named ones off")
    print("variant (off) | step speed-up it buys | rollout | update | median step s   "
          "(median over rounds of variant/base; min-max)")
    for v in variants:
        row = {}
        for part in ("step", "rollout", "update"):
            get = (lambda d, i: d["rollout"][i] + d["update"][i]) if part == "step" else (lambda d, i, p=part: d[p][i])
            ratios = [get(times[v], i) / get(base, i) for i in range(a.rounds)]
            row[part] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
        row["median_step_s"] = statistics.median(x + y for x, y in zip(times[v]["rollout"], times[v]["update"]))
        table[v] = row
        print(f"{v} | " + " | ".join(f"{row[p]['median']:.2f} ({row[p]['min']:.2f}-{row[p]['max']:.2f})"
                                     for p in ("step", "rollout", "update")) + f" | {row['median_step_s']:.2f}")
    if a.json:
        a.json.write_text(json.dumps({"threads": threads, "table": table, "times": times}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
