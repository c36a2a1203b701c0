"""Options of `finegrain convert` (light module: no torch import)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import opt
from ..errors import ConfigError
from ..io import check_output_dir
from .convert import QA_PROMPTS, SOURCES


@dataclass(kw_only=True)
class ConvertConfig:
    """Convert a public preference dataset into pairs.jsonl / edits.jsonl (see finegrain.data.convert)."""

    source: str = opt(help="format of INPUT", flag="--from", choices=list(SOURCES))
    input: str = opt(help="source data: .jsonl, .jsonl.gz, .json, .parquet or a `datasets` name[:split]",
                     positional=True)
    output: str = opt(help="directory for pairs.jsonl, edits.jsonl, rejects.jsonl and convert_summary.json")
    skip_invalid: bool = opt(False, "write bad records to OUTPUT/rejects.jsonl and go on, instead of stopping at the "
                                    "first")
    qa_prompt: str = opt(QA_PROMPTS[0], "qa-feedback prompt: the question with its passages, or the question alone",
                         choices=list(QA_PROMPTS))

    def validate(self) -> None:
        for name, value in (("INPUT", self.input), ("--output", self.output)):
            if not value:
                raise ConfigError(f"missing required option {name}")
        check_output_dir(self.output, ("pairs.jsonl", "edits.jsonl", "rejects.jsonl", "convert_summary.json"))

    def source_options(self) -> dict[str, Any]:
        """The converter options of ``--from``'s source (``qa_prompt_style`` for qa-feedback; none for the others)."""
        return {"qa_prompt_style": self.qa_prompt} if self.source == "qa-feedback" else {}
