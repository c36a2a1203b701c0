"""The LLM layer's backend registry: built-ins, `register_backend`, entry points (group `finegrain.backends`),
the sandbox's self-registration, and the layer's import rule (finegrain.llm imports no stage package)."""
from __future__ import annotations

import ast
import asyncio
import json
import os
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest

from finegrain.cli import main
from finegrain.config import build_config
from finegrain.edit.core import EditConfig, edit_pairs
from finegrain.errors import ConfigError
from finegrain.llm import backends
from finegrain.llm.accounting import lookup_price
from finegrain.llm.backends import (BACKEND_NAMES, EditRequest, EditResult, JudgeRequest, JudgeResult, backend_names,
                                    get_editor, get_judge, register_backend)

SRC = Path(__file__).resolve().parents[1] / "src" / "finegrain"
STAGES = ("data", "edit", "annotate", "sft", "rm", "ppo", "eval", "sandbox")


@pytest.fixture
def registry(monkeypatch):
    """A copy of the registry for one test: what it registers is gone afterwards."""
    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._REGISTRY))
    return backends._REGISTRY


class UpperEditor:
    """A user's editor: upper-cases the first word."""

    name = "upper"
    prompt_version = "upper-v1"

    def __init__(self, model: str, **options):
        self.model, self.options = model, options

    async def edit(self, req: EditRequest) -> EditResult:
        first, _, rest = req.response.partition(" ")
        return EditResult(f"{first.upper()} {rest}", input_tokens=1, output_tokens=1)


class FirstJudge:
    name = "first"

    def __init__(self, model: str, **options):
        self.model = model

    async def judge(self, req: JudgeRequest) -> JudgeResult:
        return JudgeResult(1.0)


def test_builtin_backends_and_the_unknown_backend_error():
    assert backend_names()[:4] == ["anthropic", "openai", "hf", "file"]
    assert "openai" in BACKEND_NAMES and "nope" not in BACKEND_NAMES
    with pytest.raises(ConfigError) as e:
        get_editor("nope", "m")
    assert str(e.value).startswith("unknown backend 'nope' (choose from anthropic, openai, hf, file")
    assert "\n" not in str(e.value)
    assert lookup_price("hf", "m", {}) == (0.0, 0.0) and lookup_price("openai", "m", {"m": (1.0, 2.0)}) == (1.0, 2.0)


def test_unknown_backend_on_the_command_line_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["edit", "--backend", "nope", "--model", "m", "--data", str(tmp_path / "p.jsonl"),
              "--output", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "argument --backend: invalid choice: 'nope' (choose from 'anthropic', 'openai', 'hf', 'file'" in err


def test_a_registered_user_backend_edits_and_judges(registry, tmp_path):
    register_backend("upper", editor=UpperEditor, judge=FirstJudge)
    register_backend("upper", editor=UpperEditor, judge=FirstJudge)  # the same again: harmless
    with pytest.raises(ConfigError, match="already registered"):
        register_backend("upper", editor=UpperEditor)
    assert "upper" in backend_names() and "upper" in BACKEND_NAMES
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"id": "a", "prompt": "p", "chosen": "c", "rejected": "hello there world"}) + "\n")
    summary = edit_pairs(build_config(EditConfig, dict(data=str(data), output=str(tmp_path / "out.jsonl"),
                                                       backend="upper", model="m", backend_options={"x": 1})))
    assert summary["n_edited"] == 1 and summary["cost_usd"] == 0.0 and summary["prompt_version"] == "upper-v1"
    row = json.loads((tmp_path / "out.jsonl").read_text())
    assert row["edited"] == "HELLO there world" and row["edit_meta"]["backend"] == "upper"
    assert get_editor("upper", "m", x=1).options == {"x": 1}
    assert asyncio.run(get_judge("upper", "m").judge(JudgeRequest("i", "q", "a", "b"))).preference == 1.0


def test_a_backend_without_the_asked_role_says_so(registry):
    register_backend("judge-only", judge=FirstJudge)
    with pytest.raises(ConfigError, match="backend 'judge-only' has no editor"):
        get_editor("judge-only", "m")
    with pytest.raises(ConfigError, match="give an editor, a judge or both"):
        register_backend("nothing")


def _fake_distribution(root: Path, entry_points: str, module: str | None = None) -> None:
    """A distribution on ``root`` (put on sys.path by the test) with ``entry_points`` and a plugin module."""
    info = root / "fg_fake_plugin-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fg-fake-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(entry_points)
    if module is not None:
        (root / "fg_fake_plugin.py").write_text(module)


PLUGIN = '''
from finegrain.llm.backends import JudgeResult, register_backend

class Judge:
    name = "fake"
    def __init__(self, model, **options):
        self.model, self.options = model, options
    async def judge(self, req):
        return JudgeResult(2.0)

def register():
    register_backend("fake", judge=Judge, priced=True, default_judge_model="m0")
'''


def test_an_entry_point_is_found_and_loaded_only_when_its_name_is_asked_for(registry, tmp_path, monkeypatch):
    _fake_distribution(tmp_path, "[finegrain.backends]\nfake = fg_fake_plugin:register\n", PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fg_fake_plugin", raising=False)
    assert "fake" in backend_names() and "fake" in BACKEND_NAMES  # its name, from the metadata ...
    assert "fg_fake_plugin" not in sys.modules                    # ... without loading it
    judge = get_judge("fake", "m1", seed=3)
    assert "fg_fake_plugin" in sys.modules and judge.options == {"seed": 3}
    assert asyncio.run(judge.judge(JudgeRequest("i", "q", "a", "b"))).preference == 2.0
    assert backends.backend_spec("fake").default_judge_model == "m0"
    assert lookup_price("fake", "gpt-4o", {"gpt-4o": (2.5, 10.0)}) == (2.5, 10.0)  # registered as priced


def test_a_broken_entry_point_is_one_line(registry, tmp_path, monkeypatch):
    _fake_distribution(tmp_path, "[finegrain.backends]\nbroken = fg_no_such_module:register\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as e:
        get_editor("broken", "m")
    assert str(e.value).startswith("backend 'broken': cannot load its entry point 'fg_no_such_module:register' "
                                   "(ModuleNotFoundError") and "\n" not in str(e.value)


def test_entry_points_are_read_through_importlib_metadata(registry, monkeypatch):
    """Discovery asks importlib.metadata for the group, whatever the installed metadata holds."""
    from importlib.metadata import EntryPoint

    asked = []

    def fake_entry_points(**kw):
        asked.append(kw)
        return [EntryPoint("mine", f"{__name__}:_register_mine", "finegrain.backends")]

    monkeypatch.setattr("importlib.metadata.entry_points", fake_entry_points)
    assert backend_names()[-1] == "mine"
    assert isinstance(get_editor("mine", "m"), UpperEditor) and asked[-1] == {"group": "finegrain.backends"}


def _register_mine():
    register_backend("mine", editor=UpperEditor)


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_the_sandbox_registers_itself_when_imported_without_any_entry_point():
    code = ("import finegrain.llm.backends as b\n"
            "b._entry_points = lambda: []\n"
            "try:\n    b.get_judge('sandbox', 'gold')\nexcept Exception as e:\n    print('before:', e)\n"
            "import finegrain.sandbox.backends\n"
            "print('after:', type(b.get_judge('sandbox', 'gold')).__name__, b.backend_spec('sandbox').default_judge_model)\n")
    done = _run(code)
    assert done.returncode == 0, done.stderr
    before, after = done.stdout.splitlines()
    assert before.startswith("before: unknown backend 'sandbox' (choose from anthropic, openai, hf, file")
    assert after == "after: SandboxJudge gold"


def _installed_sandbox_entry_point() -> bool:
    try:
        eps = distribution("finegrain").entry_points
    except PackageNotFoundError:
        return False
    return any(ep.group == "finegrain.backends" and ep.name == "sandbox" for ep in eps)


@pytest.mark.skipif(not _installed_sandbox_entry_point(),
                    reason="the installed metadata of finegrain predates the finegrain.backends entry point "
                           "(reinstall: pip install -e .)")
def test_the_installed_entry_point_reaches_the_sandbox():
    code = ("import sys, finegrain.llm as llm\n"
            "assert 'finegrain.sandbox.backends' not in sys.modules\n"
            "j = llm.get_judge('sandbox', 'gold'); e = llm.get_editor('sandbox', 'oracle')\n"
            "print(type(e).__module__, type(j).__name__, type(e).__name__)\n")
    done = _run(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["finegrain.sandbox.backends", "SandboxJudge", "SandboxEditor"]


def test_import_finegrain_llm_loads_no_stage_package():
    modules = sorted(p.stem for p in (SRC / "llm").glob("*.py") if p.stem != "__init__")
    code = ("import sys, finegrain.llm\n"
            "light = 'torch' not in sys.modules and 'anthropic' not in sys.modules and 'openai' not in sys.modules\n"
            + "".join(f"import finegrain.llm.{m}\n" for m in modules)
            + "print(light, *sorted(m for m in sys.modules if m.startswith('finegrain.')))\n")
    done = _run(code)
    assert done.returncode == 0, done.stderr
    light, *loaded = done.stdout.split()
    assert light == "True"
    assert [m for m in loaded if m.split(".")[1] in STAGES + ("cli",)] == []
    assert {f"finegrain.llm.{m}" for m in modules} <= set(loaded)


def _imports(path: Path, module: str, *, top_only: bool) -> set[str]:
    """finegrain modules that ``module`` (file ``path``) imports, at module level only or anywhere."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_only else list(ast.walk(tree))
    out = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[: len(base) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            names = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out.update(n for n in names if n.startswith("finegrain"))
    return out


def _module_files() -> dict[str, Path]:
    files = {}
    for p in SRC.rglob("*.py"):
        parts = p.relative_to(SRC.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return files


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_llm_layer_imports_only_foundation_and_edit_llm_sandbox_eval_have_no_import_cycle():
    files = _module_files()
    for name, path in files.items():
        anywhere = _imports(path, name, top_only=False)
        if _layer(name) == "llm":
            stages = sorted(m for m in anywhere if _layer(m) in STAGES + ("cli",))
            assert stages == [], f"{name} imports {stages}"
        if _layer(name) in ("edit", "llm", "eval"):
            assert not [m for m in anywhere if _layer(m) == "sandbox"], f"{name} imports the sandbox"
    graph = {name: sorted(m for m in _imports(path, name, top_only=True) if m in files and m != name)
             for name, path in files.items() if _layer(name) in ("edit", "llm", "sandbox", "eval")}
    state: dict[str, str] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in graph.get(node, ()):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [node, nxt]))
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [])
