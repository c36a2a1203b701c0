"""Supervised-training plumbing shared by `finegrain sft` and `finegrain train-rm`.

Optimizer and schedule, the deterministic micro-batch plan, the held-out split, and resumable
training checkpoints without pickle: safetensors weights, tensor-only state dicts.

Layout of ``OUTPUT/checkpoints/step-NNNNNNNN/``: ``model.safetensors``, ``optimizer.pt`` and
``scheduler.pt`` (``torch.load(weights_only=True)``), ``rng_<rank>.pt`` (torch, CUDA, Python and
NumPy generator states as tensors and plain values) and ``state.json`` (step, data fingerprint),
written last: a directory without it is incomplete and ignored. The whole directory is written
under a temporary name and renamed into place. A checkpoint that cannot be restored (a corrupt,
truncated or tampered file: pickles are refused, never run) stops ``--resume`` with one line
naming the file (:func:`checkpoint_error`), and a fresh run refuses an output directory that
already holds another run's checkpoints (:func:`refuse_stale_checkpoints`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import pickle
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import speed
from .errors import ConfigError, FinegrainError, InputError, TrainingError

STATE_FILE = "state.json"


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    dirs = [d for d in root.glob("step-*") if (d / STATE_FILE).exists()]
    return sorted(dirs, key=lambda d: int(d.name.split("-")[1]))


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))


def save_training_state(root: str | Path, step: int, accelerator, model, optimizer, scheduler,
                        state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint ``step`` (all processes call this; the main process writes the shared files)."""
    from safetensors.torch import save_model

    root = Path(root)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng_{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(dict(state, step=step), indent=2))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in checkpoint_dirs(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_training_state(ckpt: Path, accelerator, model, optimizer, scheduler) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and this process's RNG; return state.json."""
    from safetensors.torch import load_model

    device = accelerator.device
    try:
        with quiet_loading():
            load_model(accelerator.unwrap_model(model), str(ckpt / "model.safetensors"),
                       device="cpu" if device.type == "cpu" else str(device))
            optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True))
            scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", map_location="cpu", weights_only=True))
            rng_file = ckpt / f"rng_{accelerator.process_index}.pt"
            if rng_file.exists():
                set_rng_state(torch.load(rng_file, weights_only=True))
        return checked_state(json.loads((ckpt / STATE_FILE).read_text()), ckpt / STATE_FILE)
    except Exception as e:  # whatever a damaged file makes torch, safetensors or json raise: one line
        raise checkpoint_error(ckpt, e) from e


def checked_state(state: Any, path: Path) -> dict[str, Any]:
    """A checkpoint's state file ``path`` as a dict with a step number (else an InputError naming it)."""
    step = state.get("step") if isinstance(state, dict) else None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise InputError("holds no step number", path=path)
    return state


def checkpoint_error(ckpt: Path, error: Exception) -> FinegrainError:
    """One line for a checkpoint that cannot be restored, naming the damaged file.

    The file is the one the error names (a missing file, a bad state file), else the first file
    of the checkpoint that fails to load on its own (loaded again only now, on the failure path).
    """
    ckpt = Path(ckpt)
    if isinstance(error, InputError) and error.path is not None:
        path, reason = Path(str(error.path)), error.message
    elif isinstance(error, FileNotFoundError) and error.filename:
        path, reason = Path(error.filename), "missing"
    else:
        path, reason = _unreadable_file(ckpt) or (ckpt, _reason(error))
    return InputError(f"cannot resume: the checkpoint is damaged or was altered ({reason}); delete {ckpt} to "
                      "resume from the checkpoint before it, or start again without --resume", path=path)


def _reason(error: Exception) -> str:
    """A short reason: the first sentence of the error's message."""
    if isinstance(error, pickle.UnpicklingError):
        return "it holds pickled objects other than tensors and plain values, refused without running them"
    if isinstance(error, EOFError):
        return "the file ends too early (truncated)"
    first = (str(error).strip().splitlines() or [""])[0].split(". ")[0][:200]
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


@contextlib.contextmanager
def quiet_loading():
    """torch warns about unusual pickle protocols while refusing them; the error line says what matters."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _unreadable_file(ckpt: Path) -> tuple[Path, str] | None:
    """``(file, reason)`` for the first file of ``ckpt`` that does not load on its own (safely), else None."""
    from accelerate.utils import load as safe_torch_load  # torch.load(weights_only=True), numpy RNG states allowed
    from safetensors.torch import load_file

    for f in sorted(p for p in ckpt.rglob("*") if p.is_file()):
        try:
            with quiet_loading():
                if f.suffix == ".safetensors":
                    load_file(str(f))
                elif f.suffix in (".pt", ".bin", ".pkl"):
                    safe_torch_load(str(f), map_location="cpu")
                elif f.suffix == ".json":
                    json.loads(f.read_text(encoding="utf-8"))
        except Exception as e:  # noqa: BLE001 - any failure names this file
            return f, _reason(e)
    return None


def refuse_stale_checkpoints(output: str | Path, resume: bool, found: list[Path]) -> None:
    """Refuse a fresh run (no --resume) in an output directory that holds checkpoints (``found``) of another run.

    Starting over there would truncate that run's metrics and leave its checkpoints beside the new ones.
    """
    if found and not resume:
        raise ConfigError(f"{output} already holds checkpoints ({found[-1].name}, ...); pass --resume to continue "
                          "that run, or choose another --output")


def check_finite(step: int, metrics: dict[str, Any], names: tuple[str, ...] = ("loss", "grad_norm"), *,
                 fp16: bool = False) -> None:
    """Stop the run (one line naming the step) when a loss, reward or gradient norm of ``step`` is NaN or infinite.

    The trainers (sft, train-rm, ppo) call this after each step and before logging or saving it,
    so a diverged step never reaches metrics.jsonl, a checkpoint or the final model. Under fp16
    loss scaling an infinite gradient norm is routine (the scaler skips that step), so it is
    not checked there. Values are reduced over processes first: every process stops together.
    """
    for name in names:
        value = metrics.get(name)
        if value is None or (fp16 and name == "grad_norm") or math.isfinite(value):
            continue
        raise TrainingError(f"the {name.replace('_', ' ')} became {value} at step {step}; stopped before saving "
                            "anything of this step (earlier checkpoints are intact): lower --lr, or check the data "
                            "and the model")


# ---------------------------------------------------------------- optimisation and data order
def make_adamw(params, **kw) -> torch.optim.AdamW:
    """AdamW with the fused kernel where torch has one for these parameters (CPU since torch 2.4, CUDA).

    The same update rule as the per-tensor loop it replaces (speed switch ``fused_adamw``,
    :mod:`finegrain.speed`; what it buys: benchmarks/RESULTS.md).
    """
    params = list(params)
    if not speed.options().fused_adamw:
        return torch.optim.AdamW(params, **kw)
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, ValueError, TypeError):  # older torch, or a device/dtype without a fused kernel
        return torch.optim.AdamW(params, **kw)


def build_optimizer(cfg, model, total_steps: int, lr: float | None = None):
    """(optimizer, scheduler) from a :class:`finegrain.config.TrainingOptions` config (``lr``: instead of cfg.lr)."""
    from transformers import get_scheduler

    lr = lr if lr is not None else cfg.lr
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        opt = make_adamw(params, lr=lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=lr, weight_decay=cfg.weight_decay)
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[cfg.lr_scheduler]
    sched = get_scheduler(name, opt, num_warmup_steps=int(cfg.warmup_ratio * total_steps),
                          num_training_steps=total_steps)
    return opt, sched


def micro_batch_plan(n: int, batch_size: int, epochs: float, seed: int) -> list[list[int]]:
    """Every micro-batch of the run, in order: a fresh seeded permutation per epoch.

    Deterministic given (n, batch_size, epochs, seed), so a resumed run finds its place by step.
    """
    per_epoch = math.ceil(n / batch_size)
    total = max(1, math.ceil(per_epoch * epochs))
    plan: list[list[int]] = []
    epoch = 0
    while len(plan) < total:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        plan += [perm[i:i + batch_size] for i in range(0, n, batch_size)]
        epoch += 1
    return plan[:total]


def held_out(item_id: str, fraction: float, seed: int) -> bool:
    """Deterministic held-out membership of an id (independent of file order)."""
    h = hashlib.sha256(f"{seed}:{item_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2 ** 64 < fraction


def save_model_into(output: Path, model, tokenizer, meta: dict) -> None:
    """Write the final model into ``output`` beside metrics.jsonl and checkpoints/ (finegrain.json last)."""
    from .models import save_checkpoint

    staging = save_checkpoint(output.parent / f".{output.name}.final", model, tokenizer, meta)
    for name in sorted((p.name for p in staging.iterdir()), key=lambda n: n == "finegrain.json"):
        os.replace(staging / name, output / name)
    shutil.rmtree(staging, ignore_errors=True)
