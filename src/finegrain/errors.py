"""Errors a user can fix. The CLI prints each as one line on stderr and exits with code 2."""
from __future__ import annotations


class FinegrainError(Exception):
    """Base class of errors caused by input or configuration, not by a bug."""


class InputError(FinegrainError):
    """Bad input, located as precisely as we can: file, record (line or index) and field.

    >>> str(InputError("must be a non-empty string", path="pairs.jsonl", record="line 3", field="chosen"))
    "pairs.jsonl: line 3: field 'chosen': must be a non-empty string"
    """

    def __init__(self, message: str, *, path: object = None, record: object = None, field: str | None = None):
        self.message, self.path, self.record, self.field = message, path, record, field
        parts = [str(p) for p in (path, record) if p is not None]
        if field is not None:
            parts.append(f"field {field!r}")
        super().__init__(": ".join(parts + [message]))


class ConfigError(FinegrainError):
    """A configuration value or combination of options that cannot work."""


class TrainingError(FinegrainError):
    """A run that cannot go on (its loss became NaN or infinite); it stops before saving anything of that step."""
