"""Backend interfaces and the backend registry (module ``finegrain.llm.backends``).

An *editor* minimally edits a response (``finegrain edit``), a *judge* compares two outputs
(``finegrain winrate``). Interfaces (stable: the sandbox's ``SandboxEditor`` / ``SandboxJudge``
and any third-party backend implement them)::

    @dataclass
    class EditRequest:  id: str; prompt: str; response: str; meta: dict   # response = the rejected response to edit
    @dataclass
    class EditResult:   text: str | None; raw: str | None = None; input_tokens: int = 0; output_tokens: int = 0;
                        error: str | None = None
    @dataclass
    class JudgeRequest: id: str; instruction: str; output_1: str; output_2: str
    @dataclass
    class JudgeResult:  preference: float; raw: str | None = None; input_tokens: int = 0; output_tokens: int = 0;
                        error: str | None = None
        # preference: 1.0 = output_1 better, 2.0 = output_2 better, 1.5 = tie (AlpacaEval's convention)
    class EditorBackend(Protocol):  name: str; model: str;  async def edit(self, req: EditRequest) -> EditResult
    class JudgeBackend(Protocol):   name: str; model: str;  async def judge(self, req: JudgeRequest) -> JudgeResult
    def get_editor(backend: str, model: str, **options) -> EditorBackend
    def get_judge(backend: str, model: str, **options) -> JudgeBackend

The registry maps a backend name to factories ``factory(model, **options)`` of its editor and/or
judge (:func:`register_backend`). Built in: ``anthropic`` (official SDK, Messages API),
``openai`` (official SDK, Chat Completions; ``base_url`` for vLLM, TGI, Ollama, llama.cpp server
or any OpenAI-compatible server), ``hf`` (a local transformers causal LM, batched; see
:mod:`finegrain.llm.local`) and ``file`` (human edits / judgements read from a file, see
:mod:`finegrain.llm.files`). Other packages add theirs through the entry-point group
``finegrain.backends``: each entry point names a callable that registers its backends, e.g. in
``pyproject.toml``::

    [project.entry-points."finegrain.backends"]
    sandbox = "finegrain.sandbox.backends:register"

An entry point is loaded only when its name is asked for and not registered yet, so no
backend's module is imported before it is used. A module may also register its backends when
it is imported (``finegrain.sandbox.backends`` does), so a backend works without installed
metadata once its module is imported.

The interfaces, and how a backend reports failure: :mod:`finegrain.llm.interfaces`.
"""
from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from ..errors import ConfigError
from .interfaces import (EditorBackend, EditRequest, EditResult, FatalBackendError, JudgeBackend,
                         JudgeRequest, JudgeResult, RetryableError, UnreachableError, resolve_api_key)

__all__ = ["EditRequest", "EditResult", "JudgeRequest", "JudgeResult", "EditorBackend", "JudgeBackend",
           "RetryableError", "UnreachableError", "FatalBackendError", "resolve_api_key",
           "ENTRY_POINT_GROUP", "BackendSpec", "register_backend", "backend_names", "BACKEND_NAMES",
           "backend_spec", "find_backend", "get_editor", "get_judge"]

ENTRY_POINT_GROUP = "finegrain.backends"


# ----------------------------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class BackendSpec:
    """A registered backend: its factories (``factory(model, **options)``) and how commands treat it.

    ``priced``: calls cost money (the price table applies; otherwise they cost 0). ``llm_options``:
    the factory takes the shared LLM options of a command (``prompt``, ``base_url``, ``api_key_env``,
    ``timeout``, ``max_tokens``, ``temperature``, ``batch_size``) besides ``--backend-options``.
    ``default_judge_model``: the judge's model when none is given (else a model is required).
    """

    name: str
    editor: Callable[..., EditorBackend] | None = None
    judge: Callable[..., JudgeBackend] | None = None
    priced: bool = False
    llm_options: bool = False
    default_judge_model: str | None = None


_REGISTRY: dict[str, BackendSpec] = {}


def register_backend(name: str, *, editor: Callable[..., EditorBackend] | None = None,
                     judge: Callable[..., JudgeBackend] | None = None, priced: bool = False,
                     llm_options: bool = False, default_judge_model: str | None = None,
                     replace: bool = False) -> BackendSpec:
    """Register backend ``name`` with an ``editor`` and/or a ``judge`` factory (``factory(model, **options)``,
    e.g. the backend class itself); see :class:`BackendSpec` for the other fields.

    Registering the same thing twice is harmless; registering something else under a taken name is
    an error unless ``replace``.
    """
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"a backend name must be a non-empty string, got {name!r}")
    if editor is None and judge is None:
        raise ConfigError(f"backend {name!r}: give an editor, a judge or both")
    spec = BackendSpec(name, editor, judge, priced, llm_options, default_judge_model)
    old = _REGISTRY.get(name)
    if old is not None and old != spec and not replace:
        raise ConfigError(f"backend {name!r} is already registered (pass replace=True to replace it)")
    _REGISTRY[name] = spec
    return spec


def _entry_points() -> list[Any]:
    from importlib.metadata import entry_points

    return list(entry_points(group=ENTRY_POINT_GROUP))


def _load_entry_point(name: str) -> BackendSpec | None:
    """Load the entry points called ``name`` until one of them registers it."""
    for ep in _entry_points():
        if ep.name != name:
            continue
        try:
            hook = ep.load()
        except Exception as e:  # a broken plugin: say which, in one line
            raise ConfigError(f"backend {name!r}: cannot load its entry point {ep.value!r} "
                              f"({type(e).__name__}: {e})") from e
        if name not in _REGISTRY and callable(hook):
            hook()
        if name in _REGISTRY:
            return _REGISTRY[name]
        logging.getLogger("finegrain.llm").warning("entry point %r of group %s did not register backend %r",
                                                   ep.value, ENTRY_POINT_GROUP, name)
    return None


def backend_names() -> list[str]:
    """Names of every backend: the registered ones, then those of entry points not loaded yet."""
    names = list(_REGISTRY)
    for ep in _entry_points():
        if ep.name not in names:
            names.append(ep.name)
    return names


class BackendNames(Sequence):
    """A live view of :func:`backend_names` (the ``choices`` of ``--backend`` / ``--judge``).

    Membership asks the registry first and reads entry-point metadata only for a name it does not
    know, so a command with a built-in backend never scans the installed packages.
    """

    def __contains__(self, name: object) -> bool:
        return name in _REGISTRY or (isinstance(name, str) and name in backend_names())

    def __iter__(self) -> Iterator[str]:
        return iter(backend_names())

    def __len__(self) -> int:
        return len(backend_names())

    def __getitem__(self, i):
        return backend_names()[i]

    def __bool__(self) -> bool:
        return True

    def __repr__(self) -> str:
        return repr(backend_names())


BACKEND_NAMES = BackendNames()


def backend_spec(name: str) -> BackendSpec:
    """The registered backend ``name``, loading its entry point when needed; an unknown name is a ConfigError."""
    spec = _REGISTRY.get(name) or _load_entry_point(name)
    if spec is None:
        raise ConfigError(f"unknown backend {name!r} (choose from {', '.join(backend_names())})")
    return spec


def find_backend(name: str) -> BackendSpec | None:
    """Like :func:`backend_spec`, but None for an unknown name."""
    try:
        return backend_spec(name)
    except ConfigError:
        return None


def _role(name: str, role: str) -> Callable[..., Any]:
    spec = backend_spec(name)
    factory = getattr(spec, role)
    if factory is None:
        having = [n for n, s in _REGISTRY.items() if getattr(s, role) is not None]
        raise ConfigError(f"backend {name!r} has no {role} (backends with one: {', '.join(having)})")
    return factory


def _declared_options(factory: Callable[..., Any]) -> tuple[list[str], tuple[str, ...]] | None:
    """(the options ``factory(model, ...)`` declares, options it takes and ignores), or None: it checks them itself.

    Declared: its ``options`` attribute when it has one (with ``ignored_options``: the built-in chat backends,
    which every command passes the shared options), else the keyword parameters of its signature (a factory
    with ``**options`` takes any).
    """
    if getattr(factory, "options", None) is not None:
        return list(factory.options), tuple(getattr(factory, "ignored_options", ()))
    try:
        params = list(inspect.signature(factory).parameters.values())[1:]  # the first takes the model
    except (TypeError, ValueError):  # no signature to read: the factory checks
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)], ()


def _check_options(name: str, factory: Callable[..., Any], options: dict[str, Any]) -> None:
    """Refuse an option that ``factory(model, ...)`` does not declare (:func:`_declared_options`), e.g. a
    misspelt ``--backend-options`` key, naming it and the known ones, instead of a TypeError."""
    declared = _declared_options(factory)
    if declared is None:
        return
    known, ignored = declared
    unknown = [k for k in options if k not in known and k not in ignored]
    if unknown:
        raise ConfigError(f"backend {name!r}: unknown option {unknown[0]!r} "
                          f"({'known: ' + ', '.join(known) if known else 'it takes no options'})")


def _make(backend: str, role: str, model: str, options: dict[str, Any]) -> Any:
    factory = _role(backend, role)
    _check_options(backend, factory, options)
    if not options or backend_spec(backend).llm_options:
        return factory(model, **options)
    try:
        return factory(model, **options)
    except (TypeError, ValueError) as e:  # a value of its --backend-options that the backend refuses
        given = ", ".join(f"{k}={v!r}" for k, v in options.items())
        raise ConfigError(f"backend {backend!r} refused its options ({given}): {e}") from e


def get_editor(backend: str, model: str, **options: Any) -> EditorBackend:
    """An editor backend by name.

    Options for ``anthropic`` / ``openai`` / ``hf``: ``prompt`` (a packaged prompt name such as
    ``minimal_edit_v1`` or a path to a prompt file), ``base_url``, ``api_key_env``, ``timeout``,
    ``max_tokens``, ``temperature``; ``hf`` also ``batch_size``, ``device``, ``dtype``. ``file``:
    ``model`` is the path of a human-edits JSONL file (no options). Other backends: options go to their
    factory. An option the backend does not know is a ConfigError naming it.
    """
    return _make(backend, "editor", model, options)


def get_judge(backend: str, model: str, **options: Any) -> JudgeBackend:
    """A pairwise judge backend by name (options as for :func:`get_editor`; default prompt ``pairwise_judge_v1``).

    ``file``: ``model`` is the path of judgements in AlpacaEval's annotations format.
    """
    return _make(backend, "judge", model, options)


# ---------------------------------------------------------------------------------------- built-in backends
def _chat_factory(backend: str, role: str) -> Callable[..., Any]:
    def factory(model: str, **options: Any) -> Any:
        from .chat import chat_backend

        return chat_backend(backend, role, model, options)

    from .chat import SHARED_OPTIONS, client_class

    factory.__qualname__ = factory.__name__ = f"{backend}_{role}"
    factory.options = tuple(sorted({"prompt", *client_class(backend).OPTIONS}))  # type: ignore[attr-defined]
    factory.ignored_options = SHARED_OPTIONS  # type: ignore[attr-defined]
    return factory


def _file_editor(model: str) -> EditorBackend:
    from .files import FileEditor

    return FileEditor(model)


def _file_judge(model: str) -> JudgeBackend:
    from .files import FileJudge

    return FileJudge(model)


for _name, _priced in (("anthropic", True), ("openai", True), ("hf", False)):
    register_backend(_name, editor=_chat_factory(_name, "editor"), judge=_chat_factory(_name, "judge"),
                     priced=_priced, llm_options=True)
register_backend("file", editor=_file_editor, judge=_file_judge)
del _name, _priced
