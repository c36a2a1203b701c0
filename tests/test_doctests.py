"""Every docstring example (``>>>``) in the package runs as part of the test suite.

Each finegrain module is imported and its examples run with :mod:`doctest`; a module whose source
has ``>>>`` must have examples that ran, so an example that stops being found fails too.
"""
from __future__ import annotations

import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

import finegrain

SRC = Path(finegrain.__file__).parent
MODULES = sorted(m.name for m in pkgutil.walk_packages(finegrain.__path__, "finegrain.")
                 if m.name != "finegrain.__main__")  # importing it runs the CLI


def _path(name: str) -> Path:
    rel = Path(*name.split(".")[1:])
    return (SRC / rel).with_suffix(".py") if (SRC / rel).with_suffix(".py").is_file() else SRC / rel / "__init__.py"


def _has_examples(name: str) -> bool:
    return ">>> " in _path(name).read_text(encoding="utf-8")


def test_the_modules_known_to_have_examples_are_found():
    with_examples = {m for m in MODULES if _has_examples(m)}
    assert with_examples >= {"finegrain.rm.align", "finegrain.rm.evaluate", "finegrain.edit.distance",
                             "finegrain.llm.chat", "finegrain.errors", "finegrain.rm.losses"}


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:  # an optional dependency (the annotate web stack, an LLM client)
        if (e.name or "").startswith("finegrain"):
            raise
        pytest.skip(f"{name} needs {e.name}")
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in doctest.DocTestFinder(exclude_empty=True).find(module, name):
        if test.filename and Path(test.filename).resolve() != _path(name).resolve():
            continue  # an object imported from another module: run there
        runner.run(test, out=lambda text: print(text, end=""))
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (output above)"
    if _has_examples(name):
        assert result.attempted > 0, f"{name} has '>>> ' in its source but no example ran"
