"""`finegrain convert`: public preference datasets -> pairs.jsonl / edits.jsonl (see finegrain.data.convert)."""
from __future__ import annotations

import argparse
from typing import Any

from ..errors import ConfigError, InputError

SOURCE_NAMES = ("alpacafarm", "hh", "qa-feedback", "oasst")  # = convert.SOURCES, kept here so --help stays light
QA_PROMPT_NAMES = ("question+passages", "passages+question", "question")  # = convert.QA_PROMPTS
# option -> (argparse dest, default); a --config YAML may set any of these keys
_OPTIONS = {"from": ("source", None), "input": ("input", None), "output": ("output", None),
            "skip-invalid": ("skip_invalid", False), "qa-prompt": ("qa_prompt", "question+passages")}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", nargs="?", metavar="INPUT",
                        help="source data: .jsonl, .jsonl.gz, .json, .parquet or a `datasets` name[:split]")
    parser.add_argument("--from", dest="source", choices=SOURCE_NAMES, default=argparse.SUPPRESS,
                        help="format of INPUT (required)")
    parser.add_argument("--output", metavar="DIR", default=argparse.SUPPRESS,
                        help="directory for pairs.jsonl, edits.jsonl, rejects.jsonl and convert_summary.json "
                             "(required)")
    parser.add_argument("--skip-invalid", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                        help="write bad records to DIR/rejects.jsonl and go on, instead of stopping at the first "
                             "(default: stop)")
    parser.add_argument("--qa-prompt", choices=QA_PROMPT_NAMES, default=argparse.SUPPRESS,
                        help="qa-feedback prompt: the question with its passages, or the question alone "
                             "(default: question+passages)")
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="YAML mapping of the options above (from, input, output, skip-invalid, qa-prompt); "
                             "flags override it")


def resolve_options(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults < ``--config`` YAML < flags; refuses unknown keys and missing required options."""
    values = {dest: default for dest, default in _OPTIONS.values()}
    if getattr(args, "config", None):
        from ..config import load_yaml

        for key, value in load_yaml(args.config).items():
            name = str(key).replace("_", "-")
            if name not in _OPTIONS:
                raise InputError(f"unknown option (known: {', '.join(_OPTIONS)})", path=args.config, field=str(key))
            values[_OPTIONS[name][0]] = value
    values.update({dest: getattr(args, dest) for dest, _ in _OPTIONS.values()
                   if getattr(args, dest, None) is not None})
    for flag in ("from", "input", "output"):
        if values[_OPTIONS[flag][0]] in (None, ""):
            raise ConfigError(f"missing required option {'INPUT' if flag == 'input' else '--' + flag}")
    if values["source"] not in SOURCE_NAMES:
        raise ConfigError(f"--from {values['source']!r} is not one of {list(SOURCE_NAMES)}")
    if values["qa_prompt"] not in QA_PROMPT_NAMES:
        raise ConfigError(f"--qa-prompt {values['qa_prompt']!r} is not one of {list(QA_PROMPT_NAMES)}")
    if not isinstance(values["skip_invalid"], bool):
        raise ConfigError(f"skip-invalid must be true or false, got {values['skip_invalid']!r}")
    return values


def run(args: argparse.Namespace) -> dict:
    from .convert import convert

    v = resolve_options(args)
    options = {"qa_prompt_style": v["qa_prompt"]} if v["source"] == "qa-feedback" else {}
    return convert(v["source"], str(v["input"]), str(v["output"]), skip_invalid=v["skip_invalid"], **options)
