"""The import rule of docs/architecture.md, enforced on the source tree (read with ``ast``, nothing imported).

- Foundation (the modules at the package root, and ``finegrain.llm``) imports foundation only.
- A stage package imports foundation and the stages before it in pipeline order, never a later one.
- ``finegrain.cli`` and ``finegrain.__main__`` are the top: only they may import every stage.
- Imports (module-level or inside a function) form no cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "finegrain"
STAGES = ("data", "edit", "annotate", "sft", "rm", "ppo", "eval", "sandbox")
TOP = {"finegrain.cli", "finegrain.__main__", "finegrain"}
FOUNDATION_PACKAGES = ("llm",)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PKG.rglob("*.py")}


def layer(mod: str) -> tuple[str, int]:
    """("top", 99), ("foundation", -1) or ("stage", its index in pipeline order)."""
    if mod in TOP:
        return "top", 99
    parts = mod.split(".")
    if len(parts) == 2 and not (PKG / parts[1]).is_dir() or parts[1] in FOUNDATION_PACKAGES:
        return "foundation", -1
    if parts[1] not in STAGES:
        raise AssertionError(f"{mod}: a package that docs/architecture.md does not place in a layer")
    return "stage", STAGES.index(parts[1])


def resolve(mod: str, is_package: bool, node: ast.ImportFrom | ast.Import, known: set[str]) -> list[str]:
    """finegrain modules an import statement loads (a name imported from a package that is itself a module counts)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "finegrain"]
    if node.level:
        base = mod.split(".") if is_package else mod.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "finegrain":
        return []
    submodules = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
    # "from . import core" loads the submodule; the package itself only as its parent
    return submodules if node.module is None and len(submodules) == len(node.names) else [target] + submodules


def imports(mod: str, path: Path, known: set[str], *, top_level_only: bool) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    nodes: list[ast.AST] = []
    if top_level_only:
        stack = list(tree.body)
        while stack:  # module-level statements, including those under a top-level if/try
            n = stack.pop()
            if isinstance(n, (ast.Import, ast.ImportFrom)):
                nodes.append(n)
            elif isinstance(n, ast.If) and not (isinstance(n.test, ast.Name) and n.test.id == "TYPE_CHECKING"):
                stack += n.body + n.orelse
            elif isinstance(n, ast.Try):
                stack += n.body + n.orelse + n.finalbody + [s for h in n.handlers for s in h.body]
    else:
        nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    out = []
    for n in nodes:
        out += [(n.lineno, t) for t in resolve(mod, is_package, n, known)]
    # importlib.import_module("finegrain.x") with a literal name counts as an import too
    for n in ast.walk(tree):
        if (isinstance(n, ast.Call) and getattr(n.func, "attr", getattr(n.func, "id", None)) == "import_module"
                and n.args and isinstance(n.args[0], ast.Constant) and isinstance(n.args[0].value, str)
                and n.args[0].value.startswith("finegrain")):
            out.append((n.lineno, n.args[0].value))
    return out


def test_every_package_has_a_layer():
    for mod in modules():
        layer(mod)


def test_imports_point_down_the_layers():
    mods = modules()
    known = set(mods)
    bad = []
    for mod, path in sorted(mods.items()):
        kind, rank = layer(mod)
        if kind == "top":
            continue
        for line, target in imports(mod, path, known, top_level_only=False):
            if target == "finegrain":
                continue
            t_kind, t_rank = layer(target)
            allowed = (t_kind == "foundation") if kind == "foundation" else (t_kind == "foundation" or t_rank <= rank)
            if not allowed:
                bad.append(f"{path.relative_to(SRC)}:{line}: {mod} ({kind}) imports {target} ({t_kind})")
    assert not bad, "imports against docs/architecture.md's rule:\n" + "\n".join(bad)


def test_no_import_cycles():
    mods = modules()
    known = set(mods)
    graph = {m: {t for _, t in imports(m, p, known, top_level_only=False) if t in known and t != m}
             for m, p in mods.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    assert not cycles, f"import cycles (module-level or lazy): {cycles}"


@pytest.mark.parametrize("source, expected", [
    ("from ..rm.model import RewardModel", ["finegrain.rm.model"]),
    ("from . import model", ["finegrain.ppo.model"]),
    ("from .model import X", ["finegrain.ppo.model"]),
    ("import finegrain.io", ["finegrain.io"]),
    ("import numpy", []),
])
def test_resolve_reads_relative_and_absolute_imports(source, expected):
    node = ast.parse(source).body[0]
    assert resolve("finegrain.ppo.train", False, node, {"finegrain.ppo.model"}) == expected


def test_the_rule_catches_an_upward_import():
    assert layer("finegrain.sft.data") == ("stage", STAGES.index("sft"))
    assert layer("finegrain.io") == ("foundation", -1)
    assert layer("finegrain.cli") == ("top", 99)
    assert layer("finegrain.rm.inputs")[1] > layer("finegrain.sft.data")[1]  # sft -> rm would be refused
