"""Options of ``finegrain annotate serve``, ``add-annotator`` and ``export`` (one source of help text)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import opt
from ..errors import ConfigError

if TYPE_CHECKING:
    from .inputs import Guidelines

# The error types offered when marking a flawed span (the paper's edit targets: safety,
# helpfulness, accuracy, instruction following; plus tone and coherence).
DEFAULT_ERROR_TYPES = ("inaccurate", "unsafe", "unhelpful", "ignores instruction", "rude", "incoherent", "other")
SELECT_RULES = ("consensus", "all")


def edit_max_ratio_default() -> float:
    """The default of ``finegrain edit --max-edit-ratio``, read from its config (never copied)."""
    from ..edit.core import EditConfig

    return next(f.default for f in dataclasses.fields(EditConfig) if f.name == "max_edit_ratio")


@dataclass
class ServeConfig:
    data: str = opt(help="preference pairs to annotate (prompt, chosen, rejected[, id]), any format `finegrain "
                         "edit --data` reads; pairs added to the file later are appended to the queues")
    db: str = opt(help="SQLite database of annotators, queues, drafts and annotations (created on first start; "
                       "restart with the same file to resume)")
    host: str = opt("127.0.0.1", "address to listen on; 0.0.0.0 opens the app to your network (put TLS in front "
                                 "and set --public-url)")
    port: int = opt(8000, "port to listen on")
    public_url: str | None = opt(None, "base URL written into login links (default http://HOST:PORT)")
    overlap: int = opt(1, "annotators per pair (K): each pair goes to at most K annotators, each annotator sees "
                          "a pair at most once")
    prefill: str | None = opt(None, "edited pairs (the output of `finegrain edit`) whose edits start the box, so "
                                    "people correct an LLM's edit instead of starting from the original")
    screening: str | None = opt(None, "screening pairs with a known answer ('expected': 'nothing_to_fix', or "
                                      "'edited' and/or 'gold_spans'), mixed into every queue")
    screening_rate: float = opt(0.1, "share of each annotator's items that are screening items (one in "
                                     "round(1/RATE), while unseen ones remain)")
    guidelines: str = opt("minimal_edit_v1", "packaged guidelines version or the path of a text file of your "
                                             "own (its version is NAME@sha256[:8])")
    max_edit_ratio: float = opt(edit_max_ratio_default(), "warn past this edit ratio (the default is `finegrain "
                                                          "edit --max-edit-ratio`'s, past which it drops an edit "
                                                          "as non-minimal)")
    error_types: list[str] = opt(default_factory=lambda: list(DEFAULT_ERROR_TYPES),
                                 help="error types offered when marking a flawed span")
    allowed_hosts: list[str] = opt(default_factory=list, help="Host names accepted besides HOST, localhost and "
                                                              "127.0.0.1 (a guard against DNS rebinding)")
    skip_invalid: bool = opt(False, "skip invalid pair records (written to DATA.rejects.jsonl) instead of stopping")
    log_level: str = opt("info", "server log level", choices=["critical", "error", "warning", "info", "debug"])

    def validate(self) -> None:
        if self.overlap < 1:
            raise ConfigError("--overlap must be at least 1")
        if not 0 <= self.screening_rate <= 0.5:
            raise ConfigError("--screening-rate must be in [0, 0.5] (0 = no screening items)")
        if not 0 < self.max_edit_ratio <= 1:
            raise ConfigError("--max-edit-ratio must be in (0, 1]")
        if not 1 <= self.port <= 65535:
            raise ConfigError("--port must be in [1, 65535]")
        if not self.error_types or any(not t.strip() or len(t) > 40 for t in self.error_types):
            raise ConfigError("--error-types needs one or more names of 1 to 40 characters")
        if self.public_url is not None and not self.public_url.startswith(("http://", "https://")):
            raise ConfigError("--public-url must start with http:// or https://")


@dataclass
class AddAnnotatorConfig:
    name: str = opt(help="the annotator's name (shown on the admin page and written into the export)",
                    positional=True, flag="--name")
    db: str = opt(help="the annotation database (made by `finegrain annotate serve`)")
    admin: bool = opt(False, "give this login the admin view (counts, times, agreement, export)")
    new_token: bool = opt(False, "replace the token of an existing annotator (their old link stops working)")
    public_url: str | None = opt(None, "base URL of the login link (default: the one the server last started with)")

    def validate(self) -> None:
        if self.public_url is not None and not self.public_url.startswith(("http://", "https://")):
            raise ConfigError("--public-url must start with http:// or https://")


@dataclass
class ExportConfig:
    db: str = opt(help="the annotation database")
    output: str = opt(help="human-edits JSONL for `finegrain edit --backend file --model OUTPUT`")
    select: str = opt("consensus", "with several annotators of a pair: 'consensus' writes the one edit that agrees "
                                   "best with the others (ties: the earliest), 'all' writes every edit (ids then "
                                   "repeat: combine with --annotator for one file per person)", choices=SELECT_RULES)
    annotator: str | None = opt(None, "export only this annotator's edits")
    include_screening: bool = opt(False, "also export the edits of screening items")


@dataclass
class AppSettings:
    """What the web app needs besides the database, derived once from a :class:`ServeConfig` by ``serve``."""

    overlap: int
    screening_every: int  # every n-th item of a queue is a screening item (0 = none)
    guidelines: Guidelines
    max_edit_ratio: float
    error_types: list[str]
    allowed_hosts: list[str]
    public_url: str | None = None


__all__ = ["AddAnnotatorConfig", "AppSettings", "DEFAULT_ERROR_TYPES", "ExportConfig", "SELECT_RULES", "ServeConfig",
           "edit_max_ratio_default"]
