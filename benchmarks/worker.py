"""One measurement in its own process: ``python benchmarks/worker.py TASK --assets DIR --out FILE.json [k=v ...]``.

``run.py`` starts one worker per trial so memory, thread settings and allocator state never leak
from one side of a comparison to the other. Extra ``key=value`` arguments are passed to the
task function (numbers parsed as JSON). The result dict is written atomically to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("FINEGRAIN_PROGRESS", "0")
os.environ.setdefault("WANDB_DISABLED", "true")


def _task(name: str):
    if name == "trl_ppo":
        from trl_side import run_ppo
        return run_ppo
    if name == "trl_rm":
        from trl_side import run_rm
        return run_rm
    if name == "fg_ppo":
        from fg_side import run_ppo
        return run_ppo
    if name == "fg_ppo_pair":
        from fg_side import run_ppo_pair
        return run_ppo_pair
    if name == "fg_rm":
        from fg_side import run_rm
        return run_rm
    if name == "peak":
        from fg_side import run_peak
        return run_peak
    raise SystemExit(f"unknown task {name!r}")


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("task")
    ap.add_argument("--assets", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    a, rest = ap.parse_known_args()
    from common import peak_rss_gb, set_threads

    set_threads()
    kwargs = {k: _value(v) for k, _, v in (x.partition("=") for x in rest)}
    t0 = time.perf_counter()
    result = _task(a.task)(a.assets, **kwargs)
    result["process_s"] = time.perf_counter() - t0
    # the whole process's high-water mark, final saves included (every trial is a fresh process); the
    # sides also record it at each step's end ("rss_at_step_gb"): the last of those is the training's peak
    result["process_peak_rss_gb"] = peak_rss_gb()
    result["peak_rss_gb"] = (result.get("rss_at_step_gb") or [result["process_peak_rss_gb"]])[-1]
    tmp = a.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
