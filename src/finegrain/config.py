"""Typed configuration: one dataclass per command, one source of help text.

Each field is declared with :func:`opt`, whose ``help`` becomes the ``--flag`` help of the
CLI (or of a positional argument, ``opt(..., positional=True)``). Values are resolved in order:
dataclass default < ``--config FILE.yaml`` < flags given on the command line. Unknown YAML keys
and wrongly typed values are refused with an error naming the file and the key. Numbers obey
one rule: every float must be finite (no NaN or infinity), and a field may declare bounds
(``opt(..., gt=0)``, ``ge``, ``le``, ``lt``), which a re-declared field in a subclass keeps
unless it declares its own. Derived values are computed where they are used, never written
back into the config.

Shared option groups. An option that several verbs take is declared once, in an
:class:`OptionGroup` here, and a verb's config *inherits* the groups it needs
(``@dataclass(kw_only=True) class PPOConfig(TrainerModelOptions, TrainerPrecisionOptions,
LoggingOptions)``): one field, one help text, one set of choices, one default for every verb.
The groups, smallest first:

- :class:`ModelOptions` -- how any verb loads a model: ``--trust-remote-code``;
  :class:`TrainerModelOptions` adds the attention kernel (``--attn-implementation``) for the
  trainers, where it matters;
- :class:`PrecisionOptions` -- ``--dtype`` of the weights (:data:`DTYPES`);
  :class:`TrainerPrecisionOptions` adds ``--mixed-precision`` (autocast) for the trainers;
- :class:`LoggingOptions` -- ``--log-with``, the trackers (one meaning: see
  :func:`finegrain.tracking.resolve_log_with`);
- :class:`TrainingOptions` -- the supervised loop shared by ``sft`` and ``train-rm``, composed of
  the three trainer groups above.

The name of the model stays each verb's own option, since what it names differs (a policy, a
reward model, a backbone). The fields of the model, precision and logging groups are never
re-declared (tests/test_options.py checks it); a trainer may re-declare a field of
:class:`TrainingOptions` for its own default or wording (``sft``'s ``--lr``, ``train-rm``'s
``--batch-size`` of pairs). ``--help`` lists a verb's own options first, then each group under
its own heading. A group's ``validate`` checks its fields and calls
``super().validate()``, so that a config's ``validate`` (which calls ``super().validate()``
too) runs the checks of every group it inherits.

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
        default_factory: Any = dataclasses.MISSING, flag: str | None = None, positional: bool = False,
        gt: float | None = None, ge: float | None = None, lt: float | None = None, le: float | None = None) -> Any:
    """A config field with its help text (and optional choices / explicit flag name / bounds of a number).

    ``flag``: the option's name when it is not ``--field-name`` (``flag="--from"``); a YAML file
    then names it the same way (``from:``). ``positional``: the value is (also) the optional
    positional argument ``FIELD_NAME``; it has no flag unless ``flag`` names one.
    ``gt``/``ge``/``lt``/``le``: the value must be >, >=, <, <= the bound (``None``, for an
    optional field, is always allowed).
    """
    bounds = {k: v for k, v in (("gt", gt), ("ge", ge), ("lt", lt), ("le", le)) if v is not None}
    meta = {"help": help, "choices": choices, "flag": flag, "positional": positional, "bounds": bounds}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for ``X``, ``X | None``, ``Optional[X]``; a bare ``dict`` is ``dict[str, Any]``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])[0] if len(args) == 1 else str, True
    return (dict[str, Any] if tp is dict else tp), False


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _flag(f: dataclasses.Field) -> str | None:
    """The field's ``--flag`` (None: a positional argument without one)."""
    if f.metadata.get("positional") and not f.metadata.get("flag"):
        return None
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _option_name(f: dataclasses.Field) -> str:
    """How messages name the option: its flag, else its positional argument (``INPUT``)."""
    return _flag(f) or f.name.upper()


def _yaml_key(f: dataclasses.Field) -> str:
    """The key of the field in a ``--config`` file (dashes or underscores): its flag's name, else the field's."""
    flag = _flag(f)
    return flag[2:].replace("-", "_") if flag else f.name


_BOUND_OPS = {"gt": (operator.gt, ">"), "ge": (operator.ge, ">="), "lt": (operator.lt, "<"), "le": (operator.le, "<=")}


def field_bounds(cls: type, name: str) -> dict[str, float]:
    """The bounds declared for field ``name``: its own, else those of the nearest base class declaring any."""
    for klass in cls.__mro__:
        for f in dataclasses.fields(klass) if dataclasses.is_dataclass(klass) else ():
            if f.name == name and f.metadata.get("bounds"):
                return dict(f.metadata["bounds"])
    return {}


def describe_bounds(bounds: dict[str, float]) -> str:
    """``{"ge": 0, "le": 1}`` -> ``">= 0 and <= 1"`` (an integer bound in all its digits)."""
    return " and ".join(f"{_BOUND_OPS[k][1]} {v if isinstance(v, int) else f'{v:g}'}" for k, v in bounds.items())


def number_problem(value: Any, bounds: dict[str, float]) -> str | None:
    """What is wrong with a number (not finite, or out of ``bounds``), or None; other values pass."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value):
        return f"must be a finite number, got {value}"
    if any(not _BOUND_OPS[k][0](value, bound) for k, bound in bounds.items()):
        return f"must be {describe_bounds(bounds)}, got {value!r}"
    return None


def _group_titles(cls: type) -> dict[str, str]:
    """field name -> title of the :class:`OptionGroup` that declares it (the nearest one), for shared fields."""
    titles: dict[str, str] = {}
    for klass in cls.__mro__:
        if "GROUP_TITLE" in vars(klass):
            for name in vars(klass).get("__annotations__", {}):
                titles.setdefault(name, klass.GROUP_TITLE)
    return titles


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add ``--config`` and one flag per field of ``cls``; unspecified flags stay absent.

    Required options come first, then the command's own, then each shared group under its title.
    """
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of options; flags override it")
    hints = _field_types(cls)
    titles = _group_titles(cls)
    rank = {title: i for i, title in enumerate(dict.fromkeys(
        vars(k)["GROUP_TITLE"] for k in cls.__mro__ if "GROUP_TITLE" in vars(k)))}
    ordered = sorted(dataclasses.fields(cls), key=lambda f: (
        not _required(f), f.name in titles, rank.get(titles.get(f.name, ""), -1)))
    sections: dict[str, argparse._ArgumentGroup] = {}
    for f in ordered:
        if f.name.startswith("_"):
            continue
        title = titles.get(f.name) if not _required(f) else None
        target = sections.setdefault(title, parser.add_argument_group(title)) if title else parser
        _add_field(target, f, hints[f.name], cls)


def _add_field(parser: Any, f: dataclasses.Field, hint: Any, cls: type) -> None:
    tp, _ = _base_type(hint)
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
    bounds = field_bounds(cls, f.name)
    said = default is None and "default" in f.metadata.get("help", "")  # the help text says what None means
    notes = (["required"] if _required(f) else [] if said else [f"default: {default!r}"]) \
        + ([describe_bounds(bounds)] if bounds else [])
    help_text = f"{f.metadata.get('help', '')}" + (f" ({'; '.join(notes)})" if notes else "")
    choices = f.metadata.get("choices")
    flag = _flag(f)
    if f.metadata.get("positional"):
        if tp not in (int, float, str):
            raise TypeError(f"{cls.__name__}.{f.name}: only a number or a string can be positional")
        also = [f"or {flag}"] if flag else []
        parser.add_argument(f.name, nargs="?", type=tp, choices=choices, metavar=f.name.upper(), default=argparse.SUPPRESS,
                            help=f"{f.metadata.get('help', '')}" + (f" ({'; '.join(also + notes)})" if also + notes else ""))
        if not flag:
            return
    kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
    if tp is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
    elif typing.get_origin(tp) in (list, tuple):
        (inner,) = typing.get_args(tp)[:1] or (str,)
        parser.add_argument(flag, nargs="+", type=inner, **kw)
    elif typing.get_origin(tp) is dict:
        parser.add_argument(flag, type=_parse_mapping, metavar="K=V,...", **kw)
    else:
        parser.add_argument(flag, type=tp if tp in (int, float, str) else str, choices=choices,
                            metavar=None if choices else f.name.upper(), **kw)


def _parse_mapping(text: str) -> dict[str, Any]:
    """``"seed=1,name=x"`` -> ``{"seed": 1, "name": "x"}`` (each value read as YAML)."""
    from .io import yaml_load

    out: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        k, sep, v = item.partition("=")
        if not sep or not k.strip():
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {item!r}")
        try:
            out[k.strip()] = yaml_load(v)
        except yaml.YAMLError as e:
            raise argparse.ArgumentTypeError(f"{k.strip()}: invalid value {v!r} "
                                             f"({getattr(e, 'problem', None) or 'invalid YAML'})") from e
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
            raise ConfigError(f"{where}: expected a mapping of KEY: VALUE, got {type(value).__name__} {value!r}")
        if typing.get_args(inner)[:1] == (str,):
            bad = next((k for k in value if not isinstance(k, str)), None)
            if bad is not None:
                raise ConfigError(f"{where}: keys must be strings, got {type(bad).__name__} {bad!r}")
        return dict(value)
    return value


def load_yaml(path: str) -> dict[str, Any]:
    from .io import read_yaml

    data = read_yaml(path, "config file")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError("a config file must be a mapping of option: value", path=path)
    return data


def build_config(cls: type[C], values: dict[str, Any] | None = None, *, yaml_path: str | None = None,
                 overrides: dict[str, Any] | None = None) -> C:
    """Make a ``cls`` from defaults < ``values`` < ``yaml_path`` < ``overrides``; validate types.

    ``values`` and ``overrides`` use field names. YAML keys name an option as its flag does, with
    dashes or underscores (``learning-rate`` or ``learning_rate``; ``from`` for ``--from``).
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _field_types(cls)
    merged: dict[str, Any] = dict(values or {})
    if yaml_path:
        keys = {_yaml_key(f): f.name for f in fields.values()}
        for k, v in load_yaml(yaml_path).items():
            key = keys.get(str(k).replace("-", "_"))
            if key is None:
                raise InputError(f"unknown option (known: {', '.join(sorted(keys))})", path=yaml_path, field=str(k))
            try:
                merged[key] = _coerce(v, hints[key], f"{yaml_path}: field {k!r}")
            except ConfigError as e:
                raise InputError(str(e).split(": ", 2)[-1], path=yaml_path, field=str(k)) from e
            problem = number_problem(merged[key], field_bounds(cls, key))
            if problem:
                raise InputError(problem, path=yaml_path, field=str(k))
    merged.update(overrides or {})
    for k, v in list(merged.items()):
        if k not in fields:
            raise ConfigError(f"unknown option {k!r} for {cls.__name__}")
        merged[k] = _coerce(v, hints[k], f"option {k!r}")
        problem = number_problem(merged[k], field_bounds(cls, k))
        if problem:
            raise ConfigError(f"option {_option_name(fields[k])} {problem}")
    missing = [_option_name(f) for f in fields.values() if _required(f) and f.name not in merged]
    if missing:
        raise ConfigError(f"missing required option{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    for f in fields.values():
        choices = f.metadata.get("choices")
        if choices and f.name in merged and merged[f.name] not in choices:
            raise ConfigError(f"option {_option_name(f)}: {merged[f.name]!r} is not one of {list(choices)}")
    cfg = cls(**merged)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg


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


# ---------------------------------------------------------------- shared option groups
DTYPES = ("float32", "bfloat16", "float16", "auto")
"""``--dtype``: the weights dtypes a verb can load or build a model in; ``auto`` is the checkpoint's own
(:func:`finegrain.models.resolve_dtype`)."""
MIXED_PRECISIONS = ("no", "bf16", "fp16")
"""``--mixed-precision``: no autocast, or autocast to bf16 / fp16."""
ATTENTION_IMPLEMENTATIONS = ("auto", "eager", "eager_recompute", "sdpa", "flash_attention_2")
"""``--attn-implementation``: auto (finegrain's choice, :func:`finegrain.models.pick_attention`) or a transformers kernel."""


@dataclasses.dataclass(kw_only=True)
class OptionGroup:
    """Base of the shared option groups. Each group class sets ``GROUP_TITLE`` itself (its ``--help``
    heading; a class without its own, such as a verb's config, is no group).

    Its ``validate`` checks the group's fields and calls ``super().validate()`` (this one ends the chain).
    """

    def validate(self) -> None:
        """Checks across fields (each field's own bounds are declared with it and checked by build_config)."""


@dataclasses.dataclass(kw_only=True)
class ModelOptions(OptionGroup):
    """How every verb that loads a transformers model loads it."""

    GROUP_TITLE = "model loading"

    trust_remote_code: bool = opt(False, "run model code that comes with a checkpoint or hub model (off: only "
                                         "transformers' own code runs)")


@dataclasses.dataclass(kw_only=True)
class TrainerModelOptions(ModelOptions):
    """Model loading of the trainers (sft, train-rm, ppo): also the attention kernel."""

    GROUP_TITLE = "model loading"

    attn_implementation: str = opt("auto", "attention kernel: auto = eager under bf16/fp16 autocast on a CPU "
                                           "(faster there; in ppo eager_recompute once eager's length^2 memory would "
                                           "pass 256 MiB: the same numbers, the probabilities recomputed in the "
                                           "backward pass; ppo's sampling still through SDPA), else "
                                           "transformers' default (SDPA)",
                                   choices=list(ATTENTION_IMPLEMENTATIONS))


@dataclasses.dataclass(kw_only=True)
class PrecisionOptions(OptionGroup):
    """The dtype of the weights a verb loads or builds."""

    GROUP_TITLE = "precision"

    dtype: str = opt("float32", "weights dtype; auto = the dtype the checkpoint was saved in (float32 for a model "
                                "built from scratch or a checkpoint that does not say)", choices=list(DTYPES))


@dataclasses.dataclass(kw_only=True)
class TrainerPrecisionOptions(PrecisionOptions):
    """Precision of the trainers: also autocast (fp32 master weights)."""

    GROUP_TITLE = "precision"

    mixed_precision: str = opt("no", "autocast forward passes to bf16 (or fp16 on GPUs) with fp32 master weights",
                               choices=list(MIXED_PRECISIONS))


@dataclasses.dataclass(kw_only=True)
class LoggingOptions(OptionGroup):
    """Where the trainers report metrics besides OUTPUT/metrics.jsonl (accelerate's trackers)."""

    GROUP_TITLE = "logging"

    log_with: str = opt("auto", "trackers: auto (TensorBoard when installed, W&B when configured), none, "
                                "tensorboard, wandb, or a comma-separated list")

    def validate(self) -> None:
        super().validate()
        spec = self.log_with.strip()
        if spec in ("auto", "none"):
            return
        names = [s.strip() for s in spec.split(",")]
        if not all(names) or {"auto", "none"} & set(names):
            raise ConfigError(f"--log-with {self.log_with!r}: give auto, none, or a comma-separated list of "
                              "trackers (e.g. tensorboard,wandb)")
        from accelerate.utils import LoggerType  # only when trackers are named: the check needs accelerate's list

        known = [t.value for t in LoggerType]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ConfigError(f"--log-with: unknown tracker {unknown[0]!r} (known: auto, none, {', '.join(known)})")


@dataclasses.dataclass(kw_only=True)
class TrainingOptions(TrainerModelOptions, TrainerPrecisionOptions, LoggingOptions):
    """Options every supervised trainer shares (`finegrain sft`, `finegrain train-rm`).

    A trainer's config subclasses this (``@dataclass(kw_only=True)``) and may re-declare a field
    to change its default or help text.
    """

    GROUP_TITLE = "training"

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
    seed: int = opt(0, "seed for data order, the held-out split and new weights", ge=0, le=2 ** 64 - 1)  # torch's
    skip_invalid: bool = opt(False, "skip invalid records (listed in OUTPUT/rejects.jsonl) instead of stopping")
    template: str | None = opt(None, "prompt template with {prompt} for tokenizers without a chat template "
                                     "(default: '{prompt}\\n')")

    def validate(self) -> None:
        super().validate()
        check_template(self.template, "--template")


def check_template(template: str | None, flag: str) -> None:
    """A prompt template must hold ``{prompt}``: without it every record would get the same prompt."""
    if template is not None and "{prompt}" not in template:
        raise ConfigError(f"{flag} {template!r} has no {{prompt}} to put each record's prompt in")
