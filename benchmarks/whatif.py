"""Measure proposed speed-ups of finegrain's PPO step before anyone edits src/.

``python benchmarks/whatif.py [--rounds N] [--variants a,b+c,...]``

One process builds finegrain's own PPO engine (``preflight``, ``load_models``, ``build_engine``)
on the benchmark assets, then times its real ``rollout_step`` and ``ppo_update`` again and
again, switching the proposed change on and off between calls (base, v1, v2, ..., order
rotated every round). Interleaving at the level of single calls, in one process, is what makes
a 10 % effect visible on a shared, noisy machine; whole-process A/B runs were swamped by load
swings of 3x. Each figure is the median over rounds of base time / variant time (> 1 = faster).

Variants (each is a reversible switch; ``a+b`` combines):
- ``fused_adamw``: ``torch.optim.AdamW(..., fused=True)`` (CPU default is a per-tensor loop);
- ``gelu_tanh``: GPT-2's ``gelu_new`` (8 elementwise ops in Python) -> ``gelu_pytorch_tanh``
  (the same formula in one kernel);
- ``bf16``: ``torch.autocast("cpu", bfloat16)`` around generation, the rollout forwards and
  the update's forward (the backward follows the autocast graph);
- ``bf16_update``: autocast in the update only.
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

from common import build_assets, set_threads  # noqa: E402
from fg_side import ppo_config_values  # noqa: E402

DEFAULT = "fused_adamw,gelu_tanh,bf16_update,bf16,fused_adamw+gelu_tanh+bf16"


class Switches:
    """Reversible changes to a live finegrain PPO engine."""

    def __init__(self, engine):
        import torch
        from transformers import activations

        from finegrain.ppo import train

        self.e, self.train = engine, train
        unwrapped = engine.accelerator.unwrap_model(engine.model)
        mods = list(unwrapped.modules()) + list(engine.ref_policy.modules()) + list(engine.scorer.model.modules())
        self.mlps = [m for m in mods if hasattr(m, "act") and isinstance(m.act, activations.NewGELUActivation)]
        self.gelu_new = self.mlps[0].act if self.mlps else None
        self.gelu_tanh = activations.ACT2FN["gelu_pytorch_tanh"]
        groups = [{"params": g["params"], "lr": g["lr"]} for g in engine.optimizer.param_groups]
        self.base_opt = engine.optimizer
        self.fused_opt = torch.optim.AdamW(groups, eps=engine.cfg.adam_eps, fused=True)

    @contextlib.contextmanager
    def on(self, variant: str, phase: str):
        """Context in which ``variant`` is active for ``phase`` ('rollout' or 'update'); yields the optimizer."""
        import torch

        parts = set(filter(None, variant.split("+"))) - {"base"}
        unknown = parts - {"fused_adamw", "gelu_tanh", "bf16", "bf16_update"}
        if unknown:
            raise SystemExit(f"unknown variant(s) {sorted(unknown)}")
        stack = contextlib.ExitStack()
        if "gelu_tanh" in parts:
            for m in self.mlps:
                m.act = self.gelu_tanh
            stack.callback(lambda: [setattr(m, "act", self.gelu_new) for m in self.mlps])
        if "bf16" in parts or ("bf16_update" in parts and phase == "update"):
            stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
        with stack:
            yield self.fused_opt if "fused_adamw" in parts else self.base_opt


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default=DEFAULT)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--response-length", type=int, default=32)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "finegrain-whatif")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    import torch

    from finegrain.config import build_config
    from finegrain.ppo import PPOConfig
    from finegrain.ppo.setup import load_models, preflight
    from finegrain.ppo.train import build_engine, make_accelerator, ppo_update, rollout_step

    threads = set_threads()
    assets = a.workdir / "assets"
    if not (assets / "spec.json").exists():
        build_assets(assets, response_length=a.response_length)
    variants = ["base"] + [v for v in a.variants.split(",") if v]
    steps = a.rounds * len(variants) + 2
    cfg = build_config(PPOConfig, ppo_config_values(
        assets, str(a.workdir / "run"), reward_mode="sequence", steps=steps, batch_size=a.batch_size,
        response_length=a.response_length, ppo_epochs=4, num_minibatches=1, seed=0, learning_rate=1e-5,
        temperature=1.0, kl_coef=0.05))
    run = preflight(cfg)
    acc = make_accelerator(cfg)
    e = build_engine(cfg, run, load_models(cfg, run), acc)
    sw = Switches(e)
    times: dict[str, dict[str, list[float]]] = {v: {"rollout": [], "update": []} for v in variants}
    step = 0
    for v in variants:  # warm-up: every variant once (fused kernels, autocast caches)
        with sw.on(v, "rollout"):
            r, _ = rollout_step(e, step)
        with sw.on(v, "update") as opt:
            ppo_update(acc, e.model, opt, r, cfg, step)
        step += 1
    for rnd in range(a.rounds):
        k = rnd % len(variants)
        for v in variants[k:] + variants[:k]:
            with sw.on(v, "rollout"):
                t0 = time.perf_counter()
                r, _ = rollout_step(e, step)
                t1 = time.perf_counter()
            with sw.on(v, "update") as opt:
                t2 = time.perf_counter()
                ppo_update(acc, e.model, opt, r, cfg, step)
                t3 = time.perf_counter()
            times[v]["rollout"].append(t1 - t0)
            times[v]["update"].append(t3 - t2)
            step += 1
    table = {}
    base = times["base"]
    print(f"threads {threads}; B={a.batch_size}, Lr={a.response_length}, 4 PPO epochs, {a.rounds} interleaved rounds")
    print("variant | step speed-up | rollout speed-up | update speed-up | median step s   "
          "(median over rounds of base/variant; min-max)")
    for v in variants:
        row = {}
        for part in ("step", "rollout", "update"):
            get = (lambda d, i: d["rollout"][i] + d["update"][i]) if part == "step" else (lambda d, i, p=part: d[p][i])
            ratios = [get(base, i) / get(times[v], i) for i in range(a.rounds)]
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
