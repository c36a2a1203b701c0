"""``finegrain annotate serve | add-annotator | export``: minimal-edit annotation by people.

Only ``serve`` needs the web stack (the ``annotate`` extra); the other actions use SQLite alone.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable

from ..config import add_config_arguments, config_from_args
from .config import AddAnnotatorConfig, ExportConfig, ServeConfig


def _serve(cfg: ServeConfig) -> None:
    from .server import serve

    return serve(cfg)


def _add_annotator(cfg: AddAnnotatorConfig) -> dict[str, Any]:
    from .commands import add_annotator

    return add_annotator(cfg)


def _export(cfg: ExportConfig) -> dict[str, Any]:
    from .export import export_annotations

    return export_annotations(cfg)


# action -> (config class, function, one-line help)
ACTIONS: dict[str, tuple[type, Callable, str]] = {
    "serve": (ServeConfig, _serve, "run the annotation web app on a pairs file (binds to 127.0.0.1)"),
    "add-annotator": (AddAnnotatorConfig, _add_annotator, "add an annotator and print their personal login link"),
    "export": (ExportConfig, _export, "write the human-edits file that `finegrain edit --backend file` reads"),
}


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="annotate_action", metavar="ACTION", required=True)
    for name, (cls, _, help_text) in ACTIONS.items():
        p = sub.add_parser(name, help=help_text, description=help_text[:1].upper() + help_text[1:] + ".")
        add_config_arguments(p, cls)


def run(args: argparse.Namespace) -> Any:
    cls, fn, _ = ACTIONS[args.annotate_action]
    return fn(config_from_args(cls, args))
