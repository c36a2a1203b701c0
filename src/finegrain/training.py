"""Training plumbing shared by all three trainers: `finegrain sft`, `finegrain train-rm` and `finegrain ppo`.

One checkpoint and resume format (below), the optimizer and schedule, the deterministic micro-batch
plan, the held-out split, the stop on a diverged step, and the supervised loop that sft and train-rm
share (:class:`SupervisedLoop`: micro-batches split over processes, gradient accumulation, clipping,
metrics, periodic checkpoints, resume; a stage passes in the loss of a micro-batch and its
held-out evaluation as a :class:`SupervisedStage`). PPO has its own loop (rollouts, then updates)
and the same checkpoints.

Checkpoints
-----------
``OUTPUT/checkpoints/step-NNNNNNNN/`` (eight digits), for every trainer::

    model.safetensors   the prepared model's weights (ppo: policy and value model in one file)   accelerate
    optimizer.bin       the optimizer's state dict                                                 accelerate
    scaler.pt           the loss scaler, with --mixed-precision fp16 only                          accelerate
    scheduler.pt        the learning-rate schedule (sft, train-rm; ppo sets its rate from the step)
    rng_<rank>.pt       each process's torch, CUDA, Python and NumPy generator states
    state.json          the step, accelerate's step counter (the gradient-accumulation phase), the
                        data fingerprint, the options that fix the data order and the updates (sft,
                        train-rm: :data:`RESUMED_OPTIONS`) and the trainer's own running state (ppo: KL
                        controller, reward statistics), written last

Under FSDP or DeepSpeed, accelerate writes the weights and optimizer in those engines' own sharded
forms instead of the first two files. The directory is written under a temporary name
(``.step-NNNNNNNN.tmp``) and renamed into place once state.json is in it, so a directory without
state.json is incomplete and ignored; only the newest ``--keep-checkpoints`` survive. A fresh run
refuses an output directory that already holds another run's checkpoints
(:func:`refuse_stale_checkpoints`); ``--resume`` continues from the newest checkpoint and refuses
one whose data fingerprint is not this run's (:func:`resume_training_state`). A checkpoint that
cannot be restored (a corrupt, truncated or tampered file) stops ``--resume`` with one line naming
the file (:func:`checkpoint_error`); one in the layout of an earlier finegrain (ppo's
``ppo_state.json``, sft's and train-rm's ``optimizer.pt``) is refused in one line as well.

What goes through accelerate, and why not everything: ``Accelerator.save_state``/``load_state``
know how each setup holds the weights and optimizer (DDP's wrapper, FSDP's shards, DeepSpeed's
engine) and the fp16 scaler, so those parts are theirs. Their random-number state does not fit:
accelerate pickles NumPy arrays into ``random_states_<rank>.pkl``, its ``load_state`` carries on
with fresh generators when that file fails to load (a damaged file would go unnoticed), and with
torch older than 2.4 (which finegrain supports) its loader drops ``weights_only`` and would unpickle
whatever the files hold. So its random-states file is replaced by our tensor-only ``rng_<rank>.pt``;
the schedule is saved by us (it is not prepared: accelerate steps a prepared schedule once for
each process);
accelerate's custom checkpoint objects (loaded with ``weights_only=False``) are never used; and
before ``load_state`` runs, every file of the checkpoint that torch would unpickle is opened with
``torch.load(weights_only=True)`` (memory-mapped: the tensors are not read twice), so a pickle
holding anything but tensors and plain values is refused without running it. Weights are
safetensors. DeepSpeed's own folder and FSDP's sharded (torch.distributed.checkpoint) folders are
read by those engines' loaders, outside this check.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import pickle
import random
import re
import shutil
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from . import speed
from .errors import ConfigError, FinegrainError, InputError, TrainingError

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng_{rank}.pt"
UNPICKLED = (".pt", ".bin", ".pkl")  # files torch.load reads: checked with weights_only before a resume


# ---------------------------------------------------------------- checkpoints
def checkpoint_dirs(output: str | Path) -> list[Path]:
    """The complete checkpoints of the run in ``output`` (``output/checkpoints/step-*``), oldest first."""
    root = Path(output) / CHECKPOINTS
    if not root.is_dir():
        return []
    dirs = [d for d in root.glob("step-*") if d.name[5:].isdigit() and ((d / STATE_FILE).exists() or _legacy(d))]
    return sorted(dirs, key=lambda d: int(d.name[5:]))


def _legacy(ckpt: Path) -> bool:
    """A checkpoint in a layout before this one: ppo's (``ppo_state.json``), sft's and train-rm's (``optimizer.pt``)."""
    return (ckpt / "ppo_state.json").exists() or ((ckpt / "optimizer.pt").exists()
                                                  and not (ckpt / "optimizer.bin").exists())


def fingerprint(items: Iterable[str]) -> str:
    """A short hash of ``items`` in order: what a resumed run compares with the checkpoint's (ids, prompts)."""
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]


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


def save_training_state(output: str | Path, step: int, accelerator, state: dict[str, Any], *, scheduler=None,
                        keep: int = 2) -> Path:
    """Write checkpoint ``step`` of the run in ``output`` (all processes call this; see the module docstring).

    ``state`` (JSON values: fingerprints, the trainer's running state) goes into state.json with
    the step; ``keep`` > 0 removes all but the newest ``keep`` checkpoints afterwards.
    """
    from accelerate.utils import RNG_STATE_NAME

    root = Path(output) / CHECKPOINTS
    final, tmp = root / f"step-{step:08d}", root / f".step-{step:08d}.tmp"
    rank = accelerator.process_index
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with _quiet_tied_weights():
        accelerator.save_state(str(tmp), safe_serialization=True)  # weights, optimizer, scaler (sharded where they are)
    (tmp / f"{RNG_STATE_NAME}_{rank}.pkl").unlink(missing_ok=True)  # pickled NumPy state: ours replaces it
    torch.save(rng_state(), tmp / RNG_FILE.format(rank=rank))
    if accelerator.is_main_process and scheduler is not None:
        torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
    accelerator.wait_for_everyone()  # every process has written its files before state.json and the rename
    if accelerator.is_main_process:
        state = dict(state, step=step, accelerate_step=getattr(accelerator, "step", 0))
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in checkpoint_dirs(output)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resume_training_state(output: str | Path, accelerator, *, expect: dict[str, Any], differs: str, scheduler=None,
                          restore: Callable[[dict], None] | None = None) -> dict[str, Any] | None:
    """Restore the newest checkpoint of ``output`` into the prepared objects; its state.json, or None if none
    (said in one warning line).

    ``restore(state)`` takes the trainer's own running state back (an :class:`InputError` it
    raises is reported against state.json). Afterwards each ``expect`` item (a data fingerprint)
    must equal the checkpoint's, else a :class:`ConfigError` says ``differs``.
    """
    found = checkpoint_dirs(output)
    if not found:  # said, not silent: a mistyped --output would otherwise train again from the start unnoticed
        if accelerator.is_main_process:
            logger.warning("--resume: no checkpoint in %s; starting from step 0", Path(output) / CHECKPOINTS)
        return None
    state = load_training_state(found[-1], accelerator, scheduler=scheduler, restore=restore)
    if any(state.get(k) != v for k, v in expect.items()):
        raise ConfigError(f"cannot resume from {found[-1]}: {differs}")
    return state


def load_training_state(ckpt: str | Path, accelerator, *, scheduler=None,
                        restore: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Restore checkpoint ``ckpt`` (weights, optimizer, scaler, schedule, this process's RNG); return state.json.

    Nothing in it is unpickled beyond tensors and plain values; a damaged file is one line naming it.
    """
    ckpt = Path(ckpt)
    if _legacy(ckpt):
        raise ConfigError(f"cannot resume from {ckpt}: it was written in the checkpoint layout of an earlier "
                          "finegrain; resume it with that version, or start again without --resume")
    try:
        state = checked_state(json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8")), ckpt / STATE_FILE)
        _check_unpickled_files(ckpt, accelerator)
        with quiet_loading():
            accelerator.load_state(str(ckpt))
            if scheduler is not None:
                scheduler.load_state_dict(_safe_torch_load(ckpt / SCHEDULER_FILE))
            rng_file = ckpt / RNG_FILE.format(rank=accelerator.process_index)
            if rng_file.exists():  # a process the saving run did not have starts from fresh generators
                set_rng_state(_safe_torch_load(rng_file))
        if isinstance(state.get("accelerate_step"), int) and hasattr(accelerator, "step"):
            accelerator.step = state["accelerate_step"]  # gradient-accumulation phase
        if restore is not None:
            restore(state)
        return state
    except InputError as e:
        raise checkpoint_error(ckpt, e if e.path is not None else InputError(e.message, path=ckpt / STATE_FILE)) from e
    except Exception as e:  # whatever a damaged file makes torch, safetensors, accelerate or json raise: one line
        raise checkpoint_error(ckpt, e) from e


def _check_unpickled_files(ckpt: Path, accelerator) -> None:
    """Open every file of ``ckpt`` that torch would unpickle with ``weights_only=True``: a pickle of other
    objects, or a truncated file, is an InputError naming it before accelerate reads anything.

    Without FSDP or DeepSpeed the weights and optimizer files must be there.
    """
    if accelerator.distributed_type.name not in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        for name in ("model.safetensors", "optimizer.bin"):
            if not (ckpt / name).exists():
                raise InputError("missing", path=ckpt / name)
    for f in sorted(ckpt.iterdir()):
        if f.is_file() and f.suffix in UNPICKLED:
            try:
                _safe_torch_load(f, mmap=True)
            except Exception as e:  # noqa: BLE001 - any failure names this file
                raise InputError(_reason(e), path=f) from e


def _safe_torch_load(path: Path, *, mmap: bool = False):
    """torch.load of tensors and plain values only (memory-mapped when asked and the file is a torch zip)."""
    with quiet_loading():
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))


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
        damaged = _unreadable_file(ckpt)
        if damaged is None:  # every file reads on its own: the run, not the checkpoint, differs (a model size,
            # LoRA rank or value-model choice other than the saving run's)
            detail = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), "")
            detail = f" {detail[:160]}{'...' if len(detail) > 160 else ''}" if detail else ""
            return InputError(f"cannot resume: the checkpoint does not fit this run's model or options ({_reason(error)}"
                              f"{detail}); "
                              "resume with the options it was saved with, or start again without --resume", path=ckpt)
        path, reason = damaged
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


class _TiedWeightsNote(logging.Filter):
    """Drops accelerate's "Removed shared tensor {...} while saving" warning when every name in it is an LM
    head, which transformers ties to the input embedding (GPT-2, SmolLM2) and loading ties again (the resume
    tests check the resumed run step for step): noise at every checkpoint. Other shared tensors still warn."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        names = re.findall(r"'([^']+)'", msg)
        return not ("Removed shared tensor" in msg and names
                    and all(n == "lm_head.weight" or n.endswith(".lm_head.weight") for n in names))


@contextlib.contextmanager
def _quiet_tied_weights():
    log, note = logging.getLogger("accelerate.utils.other"), _TiedWeightsNote()
    log.addFilter(note)
    try:
        yield
    finally:
        log.removeFilter(note)


@contextlib.contextmanager
def quiet_loading():
    """torch warns about unusual pickle protocols while refusing them; the error line says what matters."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _unreadable_file(ckpt: Path) -> tuple[Path, str] | None:
    """``(file, reason)`` for the first file of ``ckpt`` that does not load on its own (safely), else None."""
    from safetensors.torch import load_file

    for f in sorted(p for p in ckpt.rglob("*") if p.is_file()):
        try:
            with quiet_loading():
                if f.suffix == ".safetensors":
                    load_file(str(f))
                elif f.suffix in UNPICKLED:
                    _safe_torch_load(f)
                elif f.suffix == ".json":
                    json.loads(f.read_text(encoding="utf-8"))
        except Exception as e:  # noqa: BLE001 - any failure names this file
            return f, _reason(e)
    return None


def refuse_stale_checkpoints(output: str | Path, resume: bool, found: list[Path]) -> None:
    """Refuse a fresh run (no --resume) in an output directory that holds checkpoints (``found``) of another run.

    Starting over there would truncate that run's metrics and leave its checkpoints beside the new ones.
    An ``output`` that cannot be a directory (a file, or under one) is refused too, before any work.
    """
    from .io import check_output_dir

    check_output_dir(output)
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


def hold_parameters_in(model, dtype: torch.dtype) -> int:
    """Store every floating-point parameter of ``model`` in ``dtype``, in place; returns how many changed.

    The parameters keep their identity (``.data`` is replaced), so an optimizer built afterwards
    sees them; buffers are left alone (a rotary embedding's fp32 inverse frequencies stay exact).
    A weight tied to another (GPT-2's LM head and embedding) is one parameter and changes once.
    """
    n = 0
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
                n += 1
    return n


class MasterWeightAdamW(torch.optim.Optimizer):
    """AdamW on fp32 master copies of weights the model holds in bf16 (mixed-precision training with master weights).

    The model's trained weights live in bf16, so its forward and backward run in bf16 end to end
    (no casts of weights or activations); this optimizer keeps an fp32 copy of each of them, the
    master, and steps on those: an update far below bf16's resolution (a rate of 3e-6 moves a
    weight of 0.1 by a hundredth of its last bit) accumulates on the master instead of being
    rounded away, as it would with AdamW stepping the bf16 weights themselves. One step:

    1. :meth:`gather_grads`: each weight's gradient (bf16; summed over the step's micro-batches in
       that dtype, as DDP reduces it) is added, in fp32, to its master's and freed;
    2. AdamW (:func:`make_adamw`) steps the masters, with the hyperparameters of this optimizer's
       ``param_groups`` (set ``lr`` there, as on any optimizer);
    3. each weight becomes its master rounded to bf16.

    Clip with :meth:`clip_grad_norm_` (on the fp32 masters' gradients: :func:`clip_gradients`).
    ``state_dict`` holds AdamW's state and the masters, so a checkpoint resumes exactly;
    :meth:`restore_fp32` ends training by putting the masters themselves into the model, for the
    final save. Build it once the model is wrapped for DDP, which broadcasts rank 0's weights (a
    freshly initialised head differs between processes before that): the masters copy the weights
    as they are at construction. Not for sharded engines (FSDP, DeepSpeed): they keep their own masters.
    """

    def __init__(self, groups: list[dict], **adamw_kw):
        groups = [dict(g, params=list(g["params"])) for g in groups]
        self._masters = [[p.detach().to(torch.float32, copy=True) for p in g["params"]] for g in groups]
        self.inner = make_adamw([dict(g, params=m) for g, m in zip(groups, self._masters)], **adamw_kw)
        super().__init__(groups, dict(self.inner.defaults))

    def _pairs(self) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        for group, masters in zip(self.param_groups, self._masters):
            yield from zip(group["params"], masters)

    def masters(self) -> list[torch.Tensor]:
        """The fp32 master weights, in the order of ``param_groups``' parameters."""
        return [m for ms in self._masters for m in ms]

    @torch.no_grad()
    def gather_grads(self) -> None:
        """Move each weight's gradient onto its master (added in fp32); the weight's ``.grad`` becomes None."""
        for p, m in self._pairs():
            if p.grad is not None:
                g = p.grad.to(torch.float32)
                m.grad = g if m.grad is None else m.grad.add_(g)
                p.grad = None

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the masters' gradients (gathered first) to a total 2-norm of ``max_norm``; returns the norm before."""
        self.gather_grads()
        return torch.nn.utils.clip_grad_norm_(self.masters(), max_norm)

    def _sync_hyperparameters(self, source: list[dict], target: list[dict]) -> None:
        for s, t in zip(source, target):
            t.update({k: v for k, v in s.items() if k != "params"})

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MasterWeightAdamW.step takes no closure")
        self.gather_grads()
        self._sync_hyperparameters(self.param_groups, self.inner.param_groups)
        self.inner.step()
        for p, m in self._pairs():
            p.copy_(m)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p, m in self._pairs():
            p.grad = m.grad = None

    def state_dict(self) -> dict:
        self._sync_hyperparameters(self.param_groups, self.inner.param_groups)
        # the live tensors, as AdamW's own state_dict gives its moments: a checkpoint holds no second copy in memory
        return {"adamw": self.inner.state_dict(), "masters": [m.detach() for m in self.masters()]}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Restore AdamW's state and the masters, and set the weights to the masters rounded (a ValueError when
        the state is not of these parameters)."""
        if not isinstance(state_dict, dict) or set(state_dict) != {"adamw", "masters"}:
            raise ValueError("not a MasterWeightAdamW state (expected the keys 'adamw' and 'masters'; was the "
                             "checkpoint written without --param-dtype bf16?)")
        saved, mine = state_dict["masters"], self.masters()
        if len(saved) != len(mine) or any(s.shape != m.shape for s, m in zip(saved, mine)):
            raise ValueError(f"the master weights ({len(saved)} tensors) are not this model's ({len(mine)})")
        for m, s in zip(mine, saved):
            m.copy_(s)
        for p, m in self._pairs():
            p.copy_(m)
        self.inner.load_state_dict(state_dict["adamw"])
        self._sync_hyperparameters(self.inner.param_groups, self.param_groups)

    @torch.no_grad()
    def restore_fp32(self) -> None:
        """End of training: every weight this optimizer steps becomes its fp32 master (the weight's dtype changes)."""
        for p, m in self._pairs():
            p.data = m.detach().clone()


def master_weights(optimizer) -> MasterWeightAdamW | None:
    """``optimizer`` (prepared by accelerate or not) when it is a :class:`MasterWeightAdamW`, else None."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return inner if isinstance(inner, MasterWeightAdamW) else None


def clip_gradients(accelerator, model, optimizer, max_norm: float):
    """Clip the gradient norm to ``max_norm``; returns the norm before clipping.

    Through accelerate (``clip_grad_norm_``: DDP, FSDP, fp16 unscaling), or on the fp32 masters when
    ``optimizer`` is a :class:`MasterWeightAdamW` (:func:`master_weights`).
    """
    masters = master_weights(optimizer)
    if masters is not None:
        return masters.clip_grad_norm_(max_norm)
    return accelerator.clip_grad_norm_(model.parameters(), max_norm)


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


def torch_seed(x: int) -> int:
    """``x`` as a torch generator takes it (64 bits): a larger number, e.g. a --seed of 19 digits from the
    clock times a constant, wraps round instead of overflowing."""
    return x % 2 ** 64


def micro_batch_plan(n: int, batch_size: int, epochs: float, seed: int) -> list[list[int]]:
    """Every micro-batch of the run, in order: a fresh seeded permutation per epoch.

    Deterministic given (n, batch_size, epochs, seed), so a resumed run finds its place by step.
    """
    per_epoch = math.ceil(n / batch_size)
    total = max(1, math.ceil(per_epoch * epochs))
    plan: list[list[int]] = []
    epoch = 0
    while len(plan) < total:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(torch_seed(seed * 100_003 + epoch))).tolist()
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


def refuse_changed_options(saved: Any, options: dict[str, Any], ckpt: Path, hints: dict[str, str] | None = None
                           ) -> None:
    """Refuse a resume whose ``options`` differ from those checkpoint ``ckpt`` recorded (``saved``, the
    ``options`` entry of its state.json; a checkpoint that recorded none is not checked): the resumed
    steps would take other data or update otherwise than the run they continue. ``hints`` adds a trainer's
    word on an option to its refusal (ppo: a constant-rate run can take more --steps)."""
    if not isinstance(saved, dict):
        return
    for name, value in json.loads(json.dumps(options)).items():  # as state.json holds them (tuples as lists)
        if name in saved and saved[name] != value:
            what = "the number of processes" if name == "processes" else f"--{name.replace('_', '-')}"
            hint = f" ({hints[name]})" if hints and name in hints else ""
            raise ConfigError(f"cannot resume from {ckpt}: {what} is {value!r} here but was {saved[name]!r} in "
                              "that run; resume with the options it was saved with, or start again without "
                              f"--resume{hint}")


# ---------------------------------------------------------------- the supervised loop (sft, train-rm)
MicroBatchLoss = Callable[[list[int]], tuple[torch.Tensor, dict[str, torch.Tensor]]]
RESUMED_OPTIONS = ("epochs", "batch_size", "grad_accum", "seed", "optimizer", "lr_scheduler", "warmup_ratio",
                   "weight_decay", "max_grad_norm", "max_length", "dtype", "mixed_precision")
"""Options of :class:`SupervisedLoop` that ``--resume`` must be given as the saving run had them (with ``--lr``
and the number of processes): they decide which micro-batches a step takes and how it updates the weights."""


@dataclass
class SupervisedStage:
    """What a supervised trainer brings to :class:`SupervisedLoop`.

    name:      ``sft`` or ``train-rm`` (trackers, progress bar)
    loss:      the loss of one micro-batch (this process's indices into the training examples) and
               its detached statistics, each a mean over the micro-batch (``loss`` is added)
    evaluate:  held-out metrics (``eval_*`` names), at every ``eval_every`` steps (0: none) and at
               the last; None without held-out data
    on_eval:   called with (step, line) after each evaluation, e.g. to keep the best weights
    on_step:   called with (line, seconds of the step) after the step is checked, before evaluation
    postfix:   the progress bar's postfix of a line
    """

    name: str
    loss: MicroBatchLoss
    evaluate: Callable[[], dict[str, float]] | None = None
    eval_every: int = 0
    on_eval: Callable[[int, dict], None] | None = None
    on_step: Callable[[dict, float], None] | None = None
    postfix: Callable[[dict], dict[str, str]] = lambda line: {"loss": f"{line['loss']:.3f}"}


class SupervisedLoop:
    """The optimisation loop of sft and train-rm, over the deterministic micro-batch plan.

    Built from a :class:`finegrain.config.TrainingOptions` config, an accelerator, the model and
    the number of training examples: it plans the micro-batches (``batch_size`` per process,
    ``grad_accum`` per optimizer step), builds the optimizer and schedule, and prepares the model
    and optimizer (:attr:`model`, :attr:`optimizer`). :meth:`resume` restores the newest
    checkpoint when ``--resume`` (refused when :data:`RESUMED_OPTIONS` differ from the saving
    run's); :meth:`run` trains to the end: each step every process takes its slice of each
    micro-batch (gradients synchronised on the last), clips the gradient norm, steps, stops on a
    NaN (:func:`check_finite`), evaluates, logs the line to metrics.jsonl and the trackers, and
    writes a checkpoint every ``save_every`` steps (not at the last: the final model is saved).
    """

    def __init__(self, cfg, output: str | Path, accelerator, model, n_examples: int, *, lr: float | None = None):
        self.cfg, self.output, self.accelerator = cfg, Path(output), accelerator
        world = accelerator.num_processes
        plan = micro_batch_plan(n_examples, cfg.batch_size * world, cfg.epochs, cfg.seed)
        self.groups = [plan[i:i + cfg.grad_accum] for i in range(0, len(plan), cfg.grad_accum)]
        optimizer, self.scheduler = build_optimizer(cfg, model, len(self.groups), lr)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.start = 0
        self.fingerprints: dict[str, str] = {}
        # what fixes the plan and the optimisation: a resumed run must have the saving run's (checkpoints record them)
        self.options = {"processes": world, "lr": lr if lr is not None else cfg.lr,
                        **{name: getattr(cfg, name) for name in RESUMED_OPTIONS}}

    @property
    def steps(self) -> int:
        return len(self.groups)

    def resume(self, fingerprints: dict[str, str], differs: str) -> int:
        """With ``--resume``, restore the newest checkpoint (its ``fingerprints`` must be these, else a
        ConfigError says ``differs``); the step to continue after (0 for a fresh run). Checkpoints
        written later record the same fingerprints."""
        self.fingerprints = dict(fingerprints)
        found = None
        if self.cfg.resume:
            found = resume_training_state(self.output, self.accelerator, expect=fingerprints, differs=differs,
                                          scheduler=self.scheduler)
        if found:
            refuse_changed_options(found.get("options"), self.options, checkpoint_dirs(self.output)[-1])
        self.start = int(found["step"]) if found else 0
        return self.start

    def run(self, stage: SupervisedStage) -> dict[str, Any]:
        """Train from the resume point to the last step; the last step's metrics line ({} if none ran)."""
        from .config import to_dict
        from .tracking import MetricsLog, init_trackers, progress

        cfg, acc, steps = self.cfg, self.accelerator, self.steps
        metrics = MetricsLog(self.output / "metrics.jsonl", resume_from_step=self.start + 1 if cfg.resume else None,
                             enabled=acc.is_main_process)
        init_trackers(acc, stage.name, to_dict(cfg), first_step=self.start + 1)
        bar = progress(total=steps, initial=self.start, desc=stage.name,
                       disable=None if acc.is_main_process else True)
        self.model.train()
        line: dict[str, Any] = {}
        for step in range(self.start + 1, steps + 1):
            t0 = time.perf_counter()
            line = {"step": step, "epoch": round(step / steps * cfg.epochs, 4)}
            line.update(self.step(self.groups[step - 1], stage.loss))
            check_finite(step, line, fp16=cfg.mixed_precision == "fp16")
            if stage.on_step is not None:
                stage.on_step(line, time.perf_counter() - t0)
            if stage.evaluate is not None and ((stage.eval_every and step % stage.eval_every == 0) or step == steps):
                line.update(stage.evaluate())
                if stage.on_eval is not None:
                    stage.on_eval(step, line)
            metrics.log(line)
            acc.log({k: v for k, v in line.items() if k != "step"}, step=step)
            bar.set_postfix(**stage.postfix(line), refresh=False)  # shown by update(), at most once a second: a
            bar.update(1)                                           # log of a forced bar is not a line per step
            if cfg.save_every and step % cfg.save_every == 0 and step < steps:
                save_training_state(self.output, step, acc, dict(self.fingerprints, options=self.options),
                                    scheduler=self.scheduler, keep=cfg.keep_checkpoints)
        bar.close()
        return line

    def step(self, group: list[list[int]], loss_of: MicroBatchLoss) -> dict[str, float]:
        """One optimizer step over the micro-batches of ``group``; the statistics' means over them and the
        processes, the learning rate and the gradient norm (when clipping)."""
        acc, model, cfg = self.accelerator, self.model, self.cfg
        rank, world = acc.process_index, acc.num_processes
        sums: dict[str, torch.Tensor] = {}
        for k, mb in enumerate(group):
            local = mb[rank::world] or mb[:1]
            with contextlib.nullcontext() if k == len(group) - 1 else acc.no_sync(model):
                loss, stats = loss_of(local)
                acc.backward(loss / len(group))
            for name, value in {"loss": loss.detach(), **stats}.items():
                sums[name] = sums.get(name, 0) + value / len(group)
        grad_norm = clip_gradients(acc, model, self.optimizer, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        means = acc.reduce(torch.stack([sums[name] for name in sums]), reduction="mean").tolist()
        out = dict(zip(sums, means), lr=self.scheduler.get_last_lr()[0])
        if grad_norm is not None:
            out["grad_norm"] = float(grad_norm)
        return out
