"""Versioned prompt templates of editors and judges (module ``finegrain.llm.prompts``; package text files
under ``finegrain/llm/prompts/``).

A prompt file holds comment lines (``#``), then a ``### system`` section and a ``### user``
section. Placeholders such as ``{instruction}`` are replaced literally and in one pass, so text
that itself contains braces or placeholder names is never substituted twice. The version is
the file's stem (``minimal_edit_v1``); a released file is never changed, a new version is a new
file, and the version is part of every cache key.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import ConfigError

_SECTION_RE = re.compile(r"^### (system|user)\s*$", re.MULTILINE)
_PLACEHOLDER_RE = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class PromptTemplate:
    version: str
    system: str
    user: str

    @property
    def digest(self) -> str:
        """sha256 of the template text: a changed file never reuses cached answers."""
        return hashlib.sha256(f"{self.system}\0{self.user}".encode()).hexdigest()

    def render(self, **values: str) -> tuple[str, str]:
        """``(system, user)`` with each ``{name}`` replaced by ``values[name]`` (one pass)."""
        return _fill(self.system, values), _fill(self.user, values)


def _fill(template: str, values: dict[str, str]) -> str:
    return _PLACEHOLDER_RE.sub(lambda m: values[m.group(1)] if m.group(1) in values else m.group(0), template)


def parse_prompt(text: str, version: str) -> PromptTemplate:
    parts = _SECTION_RE.split(text)
    # parts = [preamble, 'system', body, 'user', body]
    sections = {parts[i]: parts[i + 1].strip("\n") for i in range(1, len(parts) - 1, 2)}
    if "user" not in sections:
        raise ConfigError(f"prompt {version!r}: no '### user' section")
    return PromptTemplate(version, sections.get("system", "").strip(), sections["user"].strip())


def packaged_prompts() -> list[str]:
    return sorted(p.name[:-4] for p in resources.files("finegrain.llm").joinpath("prompts").iterdir()
                  if p.name.endswith(".txt"))


def load_prompt(name_or_path: str) -> PromptTemplate:
    """A packaged prompt by name (``minimal_edit_v1``) or a prompt file by path (version = its stem)."""
    path = Path(name_or_path)
    if path.suffix == ".txt" and path.exists():
        return parse_prompt(path.read_text(encoding="utf-8"), path.stem)
    res = resources.files("finegrain.llm").joinpath("prompts", f"{name_or_path}.txt")
    if not res.is_file():
        raise ConfigError(f"no prompt {name_or_path!r}: give a packaged prompt ({', '.join(packaged_prompts())}) "
                          "or the path of a .txt prompt file")
    return parse_prompt(res.read_text(encoding="utf-8"), name_or_path)
