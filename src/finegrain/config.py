"""Typed configuration: one dataclass per command, one source of help text.

Each field is declared with :func:`opt`, whose ``help`` becomes the ``--flag`` help of the
CLI. Values are resolved in order: dataclass default < ``--config FILE.yaml`` < flags given
on the command line. Unknown YAML keys and wrongly typed values are refused with an error
naming the file and the key. Numbers obey one rule: every float must be finite (no NaN or
infinity), and a field may declare bounds (``opt(..., gt=0)``, ``ge``, ``le``, ``lt``), which
a re-declared field in a subclass keeps unless it declares its own. Derived values are
computed where they are used, never written back into the config.

:func:`config_command` turns a config class and a function into a verb (``configure`` and
``run`` for :mod:`finegrain.cli`), so that stages never import the CLI.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import operator
import types
import typing
from typing import Any, Callable, TypeVar

import yaml

from .errors import ConfigError, InputError

C = TypeVar("C")


def opt(default: Any = dataclasses.MISSING, help: str = "", *, choices: typing.Sequence[Any] | None = None,
        default_factory: Any = dataclasses.MISSING, flag: str | None = None, gt: float | None = None,
        ge: float | None = None, lt: float | None = None, le: float | None = None) -> Any:
    """A config field with its help text (and optional choices / explicit flag name / bounds of a number).

    ``gt``/``ge``/``lt``/``le``: the value must be >, >=, <, <= the bound (``None``, for an
    optional field, is always allowed).
    """
    bounds = {k: v for k, v in (("gt", gt), ("ge", ge), ("lt", lt), ("le", le)) if v is not None}
    meta = {"help": help, "choices": choices, "flag": flag, "bounds": bounds}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for ``X``, ``X | None``, ``Optional[X]``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    return tp, False


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


_BOUND_OPS = {"gt": (operator.gt, ">"), "ge": (operator.ge, ">="), "lt": (operator.lt, "<"), "le": (operator.le, "<=")}


def field_bounds(cls: type, name: str) -> dict[str, float]:
    """The bounds declared for field ``name``: its own, else those of the nearest base class declaring any."""
    for klass in cls.__mro__:
        for f in dataclasses.fields(klass) if dataclasses.is_dataclass(klass) else ():
            if f.name == name and f.metadata.get("bounds"):
                return dict(f.metadata["bounds"])
    return {}


def describe_bounds(bounds: dict[str, float]) -> str:
    """``{"ge": 0, "le": 1}`` -> ``">= 0 and <= 1"``."""
    return " and ".join(f"{_BOUND_OPS[k][1]} {v:g}" for k, v in bounds.items())


def number_problem(value: Any, bounds: dict[str, float]) -> str | None:
    """What is wrong with a number (not finite, or out of ``bounds``), or None; other values pass."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value):
        return f"must be a finite number, got {value}"
    if any(not _BOUND_OPS[k][0](value, bound) for k, bound in bounds.items()):
        return f"must be {describe_bounds(bounds)}, got {value!r}"
    return None


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add ``--config`` and one flag per field of ``cls``; unspecified flags stay absent."""
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of options; flags override it")
    hints = _field_types(cls)
    # required options first, then the command's own, then those shared with other commands
    shared = {f.name for f in dataclasses.fields(TrainingOptions)} if issubclass(cls, TrainingOptions) else set()
    ordered = sorted(dataclasses.fields(cls), key=lambda f: (
        f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING, f.name in shared))
    for f in ordered:
        if f.name.startswith("_"):
            continue
        tp, _ = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        help_text = f.metadata.get("help", "")
        bounds = field_bounds(cls, f.name)
        rule = f"; {describe_bounds(bounds)}" if bounds else ""
        help_text += f" (required{rule})" if required else f" (default: {default!r}{rule})"
        kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if tp is bool:
            parser.add_argument(_flag(f), action=argparse.BooleanOptionalAction, **kw)
            continue
        if typing.get_origin(tp) in (list, tuple):
            (inner,) = typing.get_args(tp)[:1] or (str,)
            parser.add_argument(_flag(f), nargs="+", type=inner, **kw)
            continue
        if typing.get_origin(tp) is dict:
            parser.add_argument(_flag(f), type=_parse_mapping, metavar="K=V,...", **kw)
            continue
        choices = f.metadata.get("choices")
        parser.add_argument(_flag(f), type=tp if tp in (int, float, str) else str, choices=choices,
                            metavar=None if choices else f.name.upper(), **kw)


def _parse_mapping(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        k, sep, v = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {item!r}")
        out[k.strip()] = yaml.safe_load(v)
    return out


def _coerce(value: Any, tp: Any, where: str) -> Any:
    inner, optional = _base_type(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: must not be null")
    if inner is Any:
        return value
    if inner is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
    if inner is int and isinstance(value, bool):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if inner in (int, str, bool):
        if not isinstance(value, inner):
            raise ConfigError(f"{where}: expected {inner.__name__}, got {type(value).__name__} {value!r}")
        return value
    origin = typing.get_origin(inner)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        args = typing.get_args(inner)
        return [(_coerce(v, args[0], where) if args else v) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    return value


def load_yaml(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError as e:
        raise InputError("no such config file", path=path) from e
    except yaml.YAMLError as e:
        raise InputError(f"invalid YAML: {e}", path=path) from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError("a config file must be a mapping of option: value", path=path)
    return data


def build_config(cls: type[C], values: dict[str, Any] | None = None, *, yaml_path: str | None = None,
                 overrides: dict[str, Any] | None = None) -> C:
    """Make a ``cls`` from defaults < ``values`` < ``yaml_path`` < ``overrides``; validate types.

    YAML keys may use dashes or underscores (``learning-rate`` or ``learning_rate``).
    """
    names = {f.name for f in dataclasses.fields(cls)}
    hints = _field_types(cls)
    merged: dict[str, Any] = dict(values or {})
    if yaml_path:
        for k, v in load_yaml(yaml_path).items():
            key = str(k).replace("-", "_")
            if key not in names:
                raise InputError(f"unknown option (known: {', '.join(sorted(names))})", path=yaml_path, field=str(k))
            try:
                merged[key] = _coerce(v, hints[key], f"{yaml_path}: field {k!r}")
            except ConfigError as e:
                raise InputError(str(e).split(": ", 2)[-1], path=yaml_path, field=str(k)) from e
            problem = number_problem(merged[key], field_bounds(cls, key))
            if problem:
                raise InputError(problem, path=yaml_path, field=str(k))
    merged.update(overrides or {})
    for k, v in list(merged.items()):
        if k not in names:
            raise ConfigError(f"unknown option {k!r} for {cls.__name__}")
        merged[k] = _coerce(v, hints[k], f"option {k!r}")
        problem = number_problem(merged[k], field_bounds(cls, k))
        if problem:
            raise ConfigError(f"option {_flag_name(k)} {problem}")
    missing = [f.name for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in merged]
    if missing:
        raise ConfigError("missing required option(s): " + ", ".join(_flag_name(m) for m in missing))
    for f in dataclasses.fields(cls):
        choices = f.metadata.get("choices")
        if choices and f.name in merged and merged[f.name] not in choices:
            raise ConfigError(f"option {_flag_name(f.name)}: {merged[f.name]!r} is not one of {list(choices)}")
    cfg = cls(**merged)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg


def _flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return build_config(cls, yaml_path=getattr(args, "config", None), overrides=overrides)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_command(config_cls: type, fn: Callable) -> tuple[Callable, Callable]:
    """``(configure, run)`` for a verb whose options are exactly the fields of ``config_cls``.

    ``configure(parser)`` adds the options; ``run(args)`` builds the config and returns ``fn(config)``.
    Both carry the class as ``config_class``.
    """

    def configure(parser: argparse.ArgumentParser) -> None:
        add_config_arguments(parser, config_cls)

    def run(args: argparse.Namespace):
        return fn(config_from_args(config_cls, args))

    configure.config_class = run.config_class = config_cls  # type: ignore[attr-defined]  # the verb's options
    return configure, run


@dataclasses.dataclass(kw_only=True)
class TrainingOptions:
    """Options every supervised trainer shares (`finegrain sft`, `finegrain train-rm`).

    A trainer's config subclasses this (``@dataclass(kw_only=True)``) and may re-declare a field
    to change its default or help text.
    """

    epochs: float = opt(1.0, "passes over the training data (fractions allowed)", gt=0)
    batch_size: int = opt(8, "examples per micro-batch per process", ge=1)
    grad_accum: int = opt(1, "micro-batches per optimizer step", ge=1)
    lr: float = opt(1e-5, "peak learning rate", gt=0)
    weight_decay: float = opt(0.0, "decoupled weight decay (AdamW) or L2 (SGD)", ge=0)
    optimizer: str = opt("adamw", "optimizer", choices=["adamw", "sgd"])
    lr_scheduler: str = opt("linear", "learning-rate schedule after warm-up", choices=["constant", "linear", "cosine"])
    warmup_ratio: float = opt(0.03, "fraction of the optimizer steps spent warming up linearly from 0", ge=0, lt=1)
    max_length: int = opt(1024, "maximum tokens per (prompt, response); the prompt is cut from the left first", ge=2)
    max_grad_norm: float = opt(1.0, "clip the gradient norm to this (0 = no clipping)", ge=0)
    eval_fraction: float = opt(0.05, "fraction of the data held out for evaluation (by id or content hash, "
                                     "deterministic given --seed; 0 = none)", ge=0, lt=1)
    save_every: int = opt(200, "write a resumable checkpoint every N optimizer steps (0 = never)", ge=0)
    keep_checkpoints: int = opt(2, "how many of the newest step checkpoints to keep (0 = all)", ge=0)
    resume: bool = opt(False, "continue from the newest checkpoint in OUTPUT/checkpoints")
    seed: int = opt(0, "seed for data order, the held-out split and new weights")
    skip_invalid: bool = opt(False, "skip invalid records (listed in OUTPUT/rejects.jsonl) instead of stopping")
    trust_remote_code: bool = opt(False, "allow model code from the hub (off: only transformers' own code runs)")
    log_with: str = opt("auto", "trackers: auto (TensorBoard when installed, W&B when configured), none, "
                                "tensorboard, wandb, or a comma-separated list")
    dtype: str = opt("float32", "weights dtype", choices=["float32", "bfloat16", "float16"])
    mixed_precision: str = opt("no", "autocast forward passes to bf16 (or fp16 on GPUs) with fp32 master weights",
                               choices=["no", "bf16", "fp16"])
    attn_implementation: str = opt("auto", "attention kernel: auto = eager under bf16/fp16 autocast on a CPU (faster "
                                   "there), else transformers' default (SDPA)",
                                   choices=["auto", "eager", "sdpa", "flash_attention_2"])
    template: str | None = opt(None, "prompt template with {prompt} for tokenizers without a chat template "
                                     "(default: '{prompt}\\n')")

    def validate(self) -> None:
        """Checks across fields (each field's own bounds are declared with it and checked by build_config)."""
