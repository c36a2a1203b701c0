"""Reading records from every supported source and writing outputs atomically.

Sources: .jsonl, .jsonl.gz, .json (a list, or a dict holding one list), .parquet, or a
`datasets` hub name (``name`` or ``name:split``). Every record comes with a human-readable
location (``line 12`` or ``index 12``) so that validation errors can point at it. A file that
cannot be read (not parquet, corrupt gzip, JSON nested deeper than Python can parse) and a
record holding NaN or Infinity (not JSON; it could not be written back) are an
:class:`InputError` naming the file, like every other bad record. A UTF-8 byte-order mark at
the start of a JSON or JSONL file is allowed (and dropped).

An output that cannot be written is an :class:`InputError` naming it too: checked before any work
by a command (:func:`check_output_file`, :func:`check_output_dir`), and, as a last resort, when
:func:`atomic_write` fails.
"""
from __future__ import annotations

import contextlib
import gzip
import json
import math
import os
import re
import stat
import tempfile
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .errors import InputError


def _is_local(path: str) -> bool:
    return os.path.exists(path) or any(path.endswith(s) for s in (".jsonl", ".json", ".gz", ".parquet"))


def iter_records(path: str | os.PathLike, on_error: Callable[[InputError, Any], None] | None = None
                 ) -> Iterator[tuple[str, dict]]:
    """Yield ``(location, record)`` for each record of ``path``; every record must be a JSON object.

    A record that cannot be read (invalid JSON line, not an object, bytes that are not UTF-8)
    raises :class:`InputError` naming its line or index, or, when ``on_error`` is given, is
    passed to ``on_error(error, raw)`` (``raw``: the line's text or the parsed value) and skipped.
    """
    path = str(path)
    if not _is_local(path):
        yield from _iter_hub(path)
        return
    if not os.path.exists(path):
        raise InputError("no such file", path=path)
    if path.endswith(".parquet"):
        yield from _iter_parquet(path, on_error)
        return
    opener = gzip.open if path.endswith(".gz") else open
    try:
        # surrogateescape: undecodable bytes become U+DC80..U+DCFF so the error can name line and field
        with opener(path, "rt", encoding="utf-8-sig", errors="surrogateescape") as f:
            if path.endswith(".json") or path.endswith(".json.gz"):
                text = f.read()
                try:
                    data = json.loads(text)
                except json.JSONDecodeError as e:
                    raise InputError(f"invalid JSON ({e.msg} at line {e.lineno} column {e.colno})", path=path) from e
                except RecursionError as e:
                    raise InputError(_TOO_DEEP, path=path) from e
                yield from _iter_json_container(path, data, on_error, check_utf8=bool(_RAW_BYTE.search(text)))
                return
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = _parse_line(path, f"line {lineno}", line)
                except InputError as e:
                    if on_error is None:
                        raise
                    on_error(e, _printable(line.rstrip("\r\n")))
                    continue
                yield f"line {lineno}", rec
    except UnicodeDecodeError as e:
        raise InputError(f"text is not valid UTF-8 (byte {e.start})", path=path) from e
    except (OSError, EOFError, zlib.error) as e:
        if isinstance(e, FileNotFoundError):
            raise InputError("no such file", path=path) from e
        what = "a corrupt or truncated gzip file" if path.endswith(".gz") else "cannot read file"
        raise InputError(f"{what}: {e}", path=path) from e


def _rejected(err: InputError | None, rec: Any, on_error: Callable[[InputError, Any], None] | None) -> bool:
    """True when ``rec`` is bad and was handed to ``on_error``; a bad record without ``on_error`` raises."""
    if err is None:
        return False
    if on_error is None:
        raise err
    on_error(err, _shown(rec))
    return True


def _iter_parquet(path: str, on_error: Callable[[InputError, Any], None] | None) -> Iterator[tuple[str, dict]]:
    """Rows of a parquet file; a file pyarrow cannot read is one :class:`InputError`."""
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise InputError("reading parquet needs pyarrow: pip install pyarrow", path=path) from e
    try:
        rows = pq.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as e:
        reason = str(e).split("': ", 1)[-1].splitlines()[0]  # drop pyarrow's "Could not open ... '<path>'"
        raise InputError(f"not a readable parquet file ({reason})", path=path) from e
    for i, row in enumerate(rows):
        if not _rejected(_non_finite_error(path, f"index {i}", row), row, on_error):
            yield f"index {i}", row


_TOO_DEEP = "JSON nested too deeply to read (deeper than Python's recursion limit)"


def _non_finite_error(path: str, where: str, rec: dict) -> InputError | None:
    """The error for a record holding NaN or +-Infinity anywhere (JSON has neither), naming its field, or None."""
    for name, value in rec.items():
        stack = [value]
        while stack:  # iterative: a record may be nested about as deep as the parser allows
            v = stack.pop()
            if isinstance(v, float) and not math.isfinite(v):
                shown = "NaN" if math.isnan(v) else "Infinity" if v > 0 else "-Infinity"
                return InputError(f"holds {shown}, which is not JSON; write null or a finite number",
                                  path=path, record=where, field=_printable(str(name)))
            if isinstance(v, dict):
                stack.extend(v.values())
            elif isinstance(v, list):
                stack.extend(v)
    return None


# one character per undecodable byte, as produced by errors="surrogateescape"
_RAW_BYTE = re.compile("[\udc80-\udcff]")


def _bad_utf8_error(path: str, where: str, rec: Any) -> InputError:
    """The error for a record holding undecodable bytes, naming the first field that holds them."""
    def bad(v: Any) -> str | None:
        if isinstance(v, str):
            m = _RAW_BYTE.search(v)
            return f"0x{ord(m.group()) - 0xDC00:02x}" if m else None
        items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
        return next((b for k, x in items if (b := bad(k) or bad(x))), None)

    fields = rec.items() if isinstance(rec, dict) else [(None, rec)]
    for name, value in fields:
        byte = bad(name) or bad(value)
        if byte:
            return InputError(f"text is not valid UTF-8 (byte {byte}); re-encode the file as UTF-8",
                              path=path, record=where, field=None if name is None else _printable(str(name)))
    return InputError("text is not valid UTF-8; re-encode the file as UTF-8", path=path, record=where)


def _shown(rec: Any) -> Any:
    """A bad record as a rejects file can hold it: its JSON, decoded again, or as text when it holds NaN/Infinity."""
    text = _printable(json.dumps(rec, ensure_ascii=False, default=str))
    return text if "NaN" in text or "Infinity" in text else json.loads(text)


def _printable(text: str) -> str:
    """``text`` with undecodable bytes (surrogate escapes) and lone surrogates shown as U+FFFD, safe to write."""
    return re.sub("[\ud800-\udfff]", "\ufffd", text)


def _parse_line(path: str, where: str, line: str) -> dict:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        if _RAW_BYTE.search(line):
            raise _bad_utf8_error(path, where, None) from e
        raise InputError(f"invalid JSON ({e.msg} at column {e.colno})", path=path, record=where) from e
    except RecursionError as e:
        raise InputError(_TOO_DEEP, path=path, record=where) from e
    if _RAW_BYTE.search(line):
        raise _bad_utf8_error(path, where, rec)
    if not isinstance(rec, dict):
        raise InputError(f"expected a JSON object, got {type(rec).__name__}", path=path, record=where)
    err = _non_finite_error(path, where, rec)
    if err is not None:
        raise err
    return rec


def _iter_json_container(path: str, data: Any, on_error: Callable[[InputError, Any], None] | None = None,
                         check_utf8: bool = False) -> Iterator[tuple[str, dict]]:
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise InputError("a .json file must hold a list of records (or an object with exactly one list)", path=path)
        data = lists[0]
    if not isinstance(data, list):
        raise InputError(f"expected a list of records, got {type(data).__name__}", path=path)
    for i, rec in enumerate(data):
        err = None
        if check_utf8 and _RAW_BYTE.search(json.dumps(rec, ensure_ascii=False)):
            err = _bad_utf8_error(path, f"index {i}", rec)
        elif not isinstance(rec, dict):
            err = InputError(f"expected a JSON object, got {type(rec).__name__}", path=path, record=f"index {i}")
        else:
            err = _non_finite_error(path, f"index {i}", rec)
        if not _rejected(err, rec, on_error):
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
def exclusive_lock(path: str | os.PathLike, guarded: str, *, wait: bool = False):
    """Hold an exclusive OS lock on the file ``path`` (created if absent) while the block runs.

    If another process holds it, raise :class:`InputError` naming ``guarded`` (what the lock
    protects, e.g. an output file) and that process; with ``wait``, wait for it instead (a short
    read-modify-write that many runs share, such as a leaderboard).
    The lock is ``fcntl.flock``: the kernel drops it when its process ends, however it ends, so a
    killed run never leaves a stale lock (the file itself stays, empty of meaning). No-op where
    ``fcntl`` does not exist (Windows).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError as e:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise InputError(f"in use by {holder}, which holds the lock {path}; wait for it to finish or choose "
                             "another output", path=guarded) from e
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _unwritable(path: Path, directory: bool = False) -> str | None:
    """Why the file (or, with ``directory``, the directory) ``path`` cannot be created, or None if it can."""
    if directory and path.exists() and not path.is_dir():
        return "it is a file, not a directory"
    if not directory and path.is_dir():
        return "it is a directory, not a file"
    blocker = next((p for p in path.parents if p.exists()), None)  # the nearest existing ancestor
    if blocker is not None and not blocker.is_dir():
        return f"{blocker} is a file, not a directory"
    return None


def check_output_file(path: str | os.PathLike, what: str = "--output") -> None:
    """Refuse, before any work, an output file that cannot be created: an :class:`InputError` naming ``path`` and
    ``what`` gives it (``--output``, "the rejects file beside --output", ...)."""
    problem = _unwritable(Path(path))
    if problem:
        raise InputError(f"{what} cannot be written: {problem}", path=path)


def check_output_dir(path: str | os.PathLike, files: Iterable[str] = (), what: str = "--output") -> None:
    """Like :func:`check_output_file` for an output directory and the ``files`` a command writes in it."""
    problem = _unwritable(Path(path), directory=True)
    if problem:
        raise InputError(f"{what} cannot be written: {problem}", path=path)
    for name in files:
        check_output_file(Path(path) / name, f"{name} in {what}")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"):
    """Write to a temporary file beside ``path`` and rename it into place only on success.

    A crash or Ctrl-C leaves the previous version of ``path`` (if any) untouched. A file that cannot
    be written (a directory, under a file, no permission, a full disk) is an :class:`InputError` naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _write_error(path, e) from e
    try:
        os.chmod(tmp, _file_mode(path))  # mkstemp's 0600 would make every output private to its owner
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        # an OSError of the write itself (a full disk has no file name; the rename names tmp and path), not one
        # of the caller's own reading inside the block (it names its own file)
        if isinstance(e, OSError) and (e.filename is None or str(e.filename) in (str(tmp), str(path))):
            raise _write_error(path, e) from e
        raise


def _file_mode(path: Path) -> int:
    """The permissions ``open(path, "w")`` would give: those of the file it replaces, else 0666 less the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        umask = os.umask(0o077)  # reading the umask means setting it: briefly to the strictest, never looser
        os.umask(umask)
        return 0o666 & ~umask


def _write_error(path: Path, e: OSError) -> InputError:
    return InputError(f"cannot write: {_unwritable(path) or e.strerror or e}", path=path)


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
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise InputError("no such file", path=path) from e
    except IsADirectoryError as e:
        raise InputError("is a directory, not a JSON file", path=path) from e
    except UnicodeDecodeError as e:
        raise InputError(f"text is not valid UTF-8 (byte {e.start}); re-encode the file as UTF-8", path=path) from e
    except json.JSONDecodeError as e:
        raise InputError(f"invalid JSON ({e.msg} at line {e.lineno})", path=path) from e
    except RecursionError as e:
        raise InputError(_TOO_DEEP, path=path) from e
    except OSError as e:
        raise InputError(f"cannot read file ({e.strerror or e})", path=path) from e


# a number in exponent notation without a dot (1e-5, -2E+4): a float in YAML 1.2, a string to PyYAML's YAML 1.1
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


def yaml_load(stream: Any) -> Any:
    """``yaml.safe_load`` that also reads ``1e-5`` as the number it is (YAML 1.2; PyYAML would give the string)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789."))
    return yaml.load(stream, Loader=Loader)  # noqa: S506 - a SafeLoader


def read_yaml(path: str | os.PathLike, what: str) -> Any:
    """The YAML document of ``path`` (``what`` it is, for the messages: "config file", "price table"); a file that
    is missing, a directory, not UTF-8, unreadable or not YAML is an :class:`InputError` naming it."""
    import yaml

    try:
        with open(path, encoding="utf-8-sig") as f:
            return yaml_load(f)
    except FileNotFoundError as e:
        raise InputError(f"no such {what}", path=path) from e
    except IsADirectoryError as e:
        raise InputError(f"is a directory, not a {what}", path=path) from e
    except UnicodeDecodeError as e:
        raise InputError(f"text is not valid UTF-8 (byte {e.start}); re-encode the file as UTF-8", path=path) from e
    except OSError as e:
        raise InputError(f"cannot read the {what} ({e.strerror or e})", path=path) from e
    except yaml.YAMLError as e:
        raise InputError(f"invalid YAML: {e}", path=path) from e


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
