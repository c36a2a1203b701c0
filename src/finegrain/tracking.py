"""Metrics: one JSON line per step in ``metrics.jsonl`` plus accelerate's trackers (TensorBoard).

``MetricsLog`` is resumable: reopening it after a crash drops lines at or beyond the step a
run resumes from, so a resumed run never duplicates a step. Only the main process writes.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def _clean(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsLog:
    def __init__(self, path: str | os.PathLike, *, resume_from_step: int | None = None, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_from_step is None:
            self.path.write_text("")
        elif self.path.exists():  # keep only the steps the checkpoint already covers
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill
                    continue
                if rec.get("step", -1) < resume_from_step:
                    kept.append(line)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(k + "\n" for k in kept))
            os.replace(tmp, self.path)

    def log(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({k: _clean(v) for k, v in metrics.items()}) + "\n")
            f.flush()

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]


def init_trackers(accelerator, project: str, config: dict[str, Any], *, first_step: int = 1) -> None:
    """Start accelerate's trackers (those installed among tensorboard/wandb); log the config once.

    ``first_step``: the first step this run logs (after a resume, the one after the checkpoint's). TensorBoard
    hides the events an earlier run wrote from that step on (its ``purge_step``), so a resumed run shows each
    step once, as ``metrics.jsonl`` keeps it.
    """
    if accelerator.log_with is None or not accelerator.log_with:
        return
    flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config.items()}
    accelerator.init_trackers(project, config=flat, init_kwargs={"tensorboard": {"purge_step": first_step}})


def default_log_with() -> list[str]:
    """Trackers to use: TensorBoard when installed (a runtime dependency), W&B when configured."""
    import importlib.util

    out = []
    if importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None:
        out.append("tensorboard")
    if importlib.util.find_spec("wandb") is not None and os.environ.get("WANDB_API_KEY"):
        out.append("wandb")
    return out


def resolve_log_with(spec: str) -> list[str]:
    """Trackers named by a ``--log-with`` value: auto, none, or a comma-separated list.

    A tracker named but not installed is a ConfigError (accelerate would leave it out without a word).
    """
    spec = spec.strip()
    if spec == "auto":
        return default_log_with()
    if spec == "none":
        return []
    names = [s.strip() for s in spec.split(",") if s.strip()]
    from accelerate.tracking import get_available_trackers

    available = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    missing = [n for n in names if n != "all" and n not in available]  # all: every installed one
    if missing:
        from .errors import ConfigError

        raise ConfigError(f"--log-with {missing[0]}: the tracker is not installed (pip install {missing[0]}), "
                          "or use --log-with auto or none")
    return names


def progress(iterable=None, *, total=None, desc: str = "", disable: bool | None = None, **kw):
    """A tqdm bar on stderr. FINEGRAIN_PROGRESS=1 forces it on, 0 off; by default it shows on a terminal."""
    import sys

    from tqdm.auto import tqdm

    if disable is None:
        mode = os.environ.get("FINEGRAIN_PROGRESS", "auto")
        disable = mode == "0" or (mode != "1" and not sys.stderr.isatty())
    return tqdm(iterable, total=total, desc=desc, disable=disable, dynamic_ncols=True, mininterval=1.0, **kw)
