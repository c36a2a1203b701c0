"""Resumable training checkpoints without pickle: safetensors weights, tensor-only state dicts.

Layout of ``OUTPUT/checkpoints/step-NNNNNNNN/``: ``model.safetensors``, ``optimizer.pt`` and
``scheduler.pt`` (``torch.load(weights_only=True)``), ``rng_<rank>.pt`` (torch, CUDA, Python and
NumPy generator states as tensors and plain values) and ``state.json`` (step, data fingerprint),
written last: a directory without it is incomplete and ignored. The whole directory is written
under a temporary name and renamed into place.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
    load_model(accelerator.unwrap_model(model), str(ckpt / "model.safetensors"),
               device="cpu" if device.type == "cpu" else str(device))
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", map_location="cpu", weights_only=True))
    rng_file = ckpt / f"rng_{accelerator.process_index}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return json.loads((ckpt / STATE_FILE).read_text())
