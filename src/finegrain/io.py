"""Reading records from every supported source and writing outputs atomically.

Sources: .jsonl, .jsonl.gz, .json (a list, or a dict holding one list), .parquet, or a
`datasets` hub name (``name`` or ``name:split``). Every record comes with a human-readable
location (``line 12`` or ``index 12``) so that validation errors can point at it.
"""
from __future__ import annotations

import contextlib
import gzip
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import InputError


def _is_local(path: str) -> bool:
    return os.path.exists(path) or any(path.endswith(s) for s in (".jsonl", ".json", ".gz", ".parquet"))


def iter_records(path: str | os.PathLike) -> Iterator[tuple[str, dict]]:
    """Yield ``(location, record)`` for each record of ``path``; every record must be a JSON object."""
    path = str(path)
    if not _is_local(path):
        yield from _iter_hub(path)
        return
    if not os.path.exists(path):
        raise InputError("no such file", path=path)
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise InputError("reading parquet needs pyarrow: pip install pyarrow", path=path) from e
        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"index {i}", row
        return
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            if path.endswith(".json") or path.endswith(".json.gz"):
                try:
                    data = json.load(f)
                except json.JSONDecodeError as e:
                    raise InputError(f"invalid JSON ({e.msg} at line {e.lineno} column {e.colno})", path=path) from e
                yield from _iter_json_container(path, data)
                return
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"invalid JSON ({e.msg} at column {e.colno})", path=path, record=f"line {lineno}") from e
                if not isinstance(rec, dict):
                    raise InputError(f"expected a JSON object, got {type(rec).__name__}", path=path, record=f"line {lineno}")
                yield f"line {lineno}", rec
    except UnicodeDecodeError as e:
        raise InputError(f"text is not valid UTF-8 (byte {e.start})", path=path) from e
    except (OSError, EOFError) as e:
        if isinstance(e, FileNotFoundError):
            raise InputError("no such file", path=path) from e
        raise InputError(f"cannot read file: {e}", path=path) from e


def _iter_json_container(path: str, data: Any) -> Iterator[tuple[str, dict]]:
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise InputError("a .json file must hold a list of records (or an object with exactly one list)", path=path)
        data = lists[0]
    if not isinstance(data, list):
        raise InputError(f"expected a list of records, got {type(data).__name__}", path=path)
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise InputError(f"expected a JSON object, got {type(rec).__name__}", path=path, record=f"index {i}")
        yield f"index {i}", rec


def _iter_hub(name: str) -> Iterator[tuple[str, dict]]:
    """A `datasets` source: ``name`` or ``name:split`` (default split ``train``)."""
    import datasets

    repo, _, split = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, split=split or "train")
    except Exception as e:  # datasets raises many types; the user needs the name and the reason
        raise InputError(f"cannot load as a file or a `datasets` source: {e}", path=name) from e
    for i, row in enumerate(ds):
        yield f"index {i}", dict(row)


def read_records(path: str | os.PathLike) -> list[tuple[str, dict]]:
    return list(iter_records(path))


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"):
    """Write to a temporary file beside ``path`` and rename it into place only on success.

    A crash or Ctrl-C leaves the previous version of ``path`` (if any) untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, default=_json_default)
        f.write("\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    n = 0
    opener = (lambda: atomic_write(path, "wb")) if str(path).endswith(".gz") else (lambda: atomic_write(path))
    with opener() as f:
        if str(path).endswith(".gz"):
            with gzip.GzipFile(fileobj=f, mode="wb") as gz:
                for row in rows:
                    gz.write((json.dumps(row, ensure_ascii=False, default=_json_default) + "\n").encode())
                    n += 1
        else:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n")
                n += 1
    return n


def read_json(path: str | os.PathLike) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise InputError("no such file", path=path) from e
    except json.JSONDecodeError as e:
        raise InputError(f"invalid JSON ({e.msg} at line {e.lineno})", path=path) from e


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
