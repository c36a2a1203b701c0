"""The `finegrain` command: a thin layer over the Python API.

Each verb lives next to its stage as ``finegrain/<stage>/cli.py`` exposing ``configure(parser)``
and ``run(args) -> dict | None`` (most made by :func:`finegrain.config.config_command`); a
returned dict is printed as JSON on stdout. This module is the top: it imports the verb being run
(only that one), and no stage imports it. Verb modules import torch lazily so that ``--help``
stays fast. Errors the user can fix (:class:`~finegrain.errors.FinegrainError`) become one line
on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys

from .errors import FinegrainError

# verb -> (module, one-line help). Order is the pipeline's.
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("finegrain.data.cli", "convert a public dataset (alpacafarm, hh, qa-feedback, oasst) into pairs"),
    "sft": ("finegrain.sft.cli", "supervised fine-tuning of a causal LM on prompt/response data"),
    "edit": ("finegrain.edit.cli", "minimally edit the rejected response of each pair with an LLM, a file or an oracle"),
    "annotate": ("finegrain.annotate.cli", "people make the minimal edits: a local web app (serve, add-annotator, export)"),
    "train-rm": ("finegrain.rm.cli_train", "train a sequence or token-level reward model"),
    "eval-rm": ("finegrain.rm.cli_eval", "pairwise accuracy (and token AUROC) of a reward model"),
    "ppo": ("finegrain.ppo.cli", "PPO with sequence-level or token-level rewards"),
    "generate": ("finegrain.eval.cli_generate", "generate a model's outputs for a prompt set"),
    "winrate": ("finegrain.eval.cli_winrate", "pairwise win rate of outputs against reference outputs"),
    "show-rewards": ("finegrain.eval.cli_show", "HTML page of per-token rewards of a token RM"),
    "demo": ("finegrain.sandbox.cli", "the whole method end to end in a simulated environment (CPU)"),
}


# a number with a sign, as a value: -3, -0.5, -.5, -1e-3, -2E+4, -inf, -nan (argparse's own rule misses exponents)
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


class Parser(argparse.ArgumentParser):
    """argparse with finegrain's error contract: a usage error is ONE line on stderr and exit code 2.

    Negative numbers are values, never flags, so ``--lr -1e-3`` reaches the option's own check
    instead of failing as an unknown flag (no finegrain flag looks like a number).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBER

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def one_line(text: object) -> str:
    """``text`` with its line breaks (and the spaces around them) folded into single spaces."""
    return re.sub(r"\s*\n\s*", " ", str(text).strip())


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    from . import __version__

    parser = Parser(prog="finegrain", description="Fine-grained RLHF: minimal edits, token-level "
                                     "reward models and PPO with per-token rewards.")
    parser.add_argument("--version", action="version", version=f"finegrain {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    parser.verb_parser = parser  # the parser of the verb being run: the one that reports its usage errors
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text[:1].upper() + help_text[1:] + ".")
        if verb == name:  # only import the module of the verb being run
            importlib.import_module(module).configure(p)
            parser.verb_parser = p
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_libraries()
    verb = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(verb)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.verb_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.verb is None:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.verb][0])
    try:
        result = module.run(args)
    except FinegrainError as e:
        print(f"finegrain {args.verb}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"finegrain {args.verb}: interrupted", file=sys.stderr)
        return 130
    if isinstance(result, int):
        return result
    if result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
