"""Where finegrain's PPO step spends its time: ``python benchmarks/profile_ppo.py [--steps N] [--reward-mode M]``.

Runs ``train_ppo`` on the benchmark assets (built on the fly into --workdir; ``--real`` builds
the SmolLM2-135M assets of ``run.py --only real`` instead, with its sizes as defaults) under
``torch.profiler`` and prints (1) finegrain's own per-phase seconds (generate / score / update,
from metrics.jsonl), (2) the top torch operators by self CPU time over the steps after the
warm-up, (3) a cProfile view of the Python functions (cumulative), for the same steps.
For a flame graph of the same run: ``py-spy record -o ppo.svg -- python benchmarks/profile_ppo.py``.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FINEGRAIN_PROGRESS", "0")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from common import REAL_LORA, build_assets, build_real_assets, set_threads  # noqa: E402
from fg_side import ppo_config_values, step_clock  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--response-length", type=int, default=32)
    ap.add_argument("--reward-mode", default="sequence", choices=["sequence", "token"])
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "finegrain-profile")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--trace", type=Path, help="also write a Chrome trace here")
    ap.add_argument("--mixed-precision", default="no", choices=["no", "bf16"])
    ap.add_argument("--ppo-epochs", type=int, default=4)
    ap.add_argument("--param-dtype", default="fp32", choices=["fp32", "bf16"],
                    help="bf16: bf16 weights with fp32 masters (with --mixed-precision bf16)")
    ap.add_argument("--real", action="store_true",
                    help="SmolLM2-135M-Instruct (scripts/install_models.sh) as policy, reference, value and reward "
                         "model; give --batch-size 8 --ppo-epochs 1 for run.py's real-arm sizes")
    ap.add_argument("--shapes", action="store_true", help="the operator table per input shape")
    ap.add_argument("--use-lora", action="store_true", help="LoRA r 16 on q_proj and v_proj, as the real arm")
    a = ap.parse_args()
    from torch.profiler import ProfilerActivity, profile

    from finegrain.config import build_config
    from finegrain.ppo import PPOConfig, train_ppo

    threads = set_threads()
    assets = a.workdir / ("assets_real" if a.real else "assets")
    if not (assets / "spec.json").exists():
        if a.real:
            build_real_assets(assets, response_length=a.response_length)
        else:
            build_assets(assets, response_length=a.response_length)
    out = a.workdir / "run"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    values = ppo_config_values(assets, str(out), reward_mode=a.reward_mode, steps=a.steps, batch_size=a.batch_size,
                               response_length=a.response_length, ppo_epochs=a.ppo_epochs, num_minibatches=1,
                               seed=0, learning_rate=1e-5, temperature=1.0, kl_coef=0.05)
    values["mixed_precision"] = a.mixed_precision
    if a.param_dtype != "fp32":
        values["param_dtype"] = a.param_dtype
    if a.use_lora:
        values.update(REAL_LORA, use_lora=True, lora_target_modules=list(REAL_LORA["lora_target_modules"]))
    cfg = build_config(PPOConfig, values)
    prof = profile(activities=[ProfilerActivity.CPU], schedule=None,
                   record_shapes=a.shapes)
    pr = cProfile.Profile()
    warm = {"done": False}

    with step_clock() as marks:
        from finegrain.tracking import MetricsLog

        inner = MetricsLog.log

        def log(self, metrics):  # start profiling once the warm-up step has been logged
            inner(self, metrics)
            if not warm["done"]:
                warm["done"] = True
                prof.start()
                pr.enable()

        MetricsLog.log = log
        try:
            train_ppo(cfg)
        finally:
            MetricsLog.log = inner
            pr.disable()
            prof.stop()
    ms = [m.metrics for m in marks][1:]
    print(f"threads {threads}; {len(ms)} profiled steps after 1 warm-up; B={a.batch_size}, Lr={a.response_length}, "
          f"reward mode {a.reward_mode}")
    for k in ("time_generate", "time_score", "time_update"):
        xs = [m[k] for m in ms]
        print(f"  {k:14s} median {statistics.median(xs):7.3f}s  ({', '.join(f'{x:.2f}' for x in xs)})")
    tot = statistics.median([m["time_generate"] + m["time_score"] + m["time_update"] for m in ms])
    print(f"  phases total   median {tot:7.3f}s")
    print(prof.key_averages(group_by_input_shape=a.shapes).table(sort_by="self_cpu_time_total", row_limit=a.top,
                                                                 max_shapes_column_width=70))
    if a.trace:
        prof.export_chrome_trace(str(a.trace))
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(45)
    print(s.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
