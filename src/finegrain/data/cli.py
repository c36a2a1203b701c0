"""`finegrain convert`: public preference datasets -> pairs.jsonl / edits.jsonl (see finegrain.data.convert)."""
from __future__ import annotations

from ..config import config_command
from .config import ConvertConfig


def _convert(cfg: ConvertConfig) -> dict:
    from .convert import convert

    return convert(cfg.source, cfg.input, cfg.output, skip_invalid=cfg.skip_invalid, **cfg.source_options())


configure, run = config_command(ConvertConfig, _convert)
