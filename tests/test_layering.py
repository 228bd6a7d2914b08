"""The layers: a plain-Python core that imports neither Ray nor Prefect at module level, entry points
(the command line, the benchmark, the dev S3 server) that the core never imports, and no import cycle."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import pipeline

REPO = Path(__file__).resolve().parent.parent
ENTRY = ("pipeline.cli", "pipeline.bench", "pipeline.devtools", "flows")


def test_core_modules_import_neither_ray_nor_prefect():
    walked = pkgutil.walk_packages(pipeline.__path__, "pipeline.")
    modules = sorted(m.name for m in walked if not m.name.endswith(".__main__"))  # a __main__ runs on import
    assert "pipeline.execution" in modules and "pipeline.shard" in modules
    code = f"import sys, importlib\nfor m in {modules!r}: importlib.import_module(m)\n"
    code += "print(sorted(n for n in ('ray', 'prefect') if n in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def module_names() -> dict[str, Path]:
    found = {}
    for base in ("pipeline", "flows"):
        for path in (REPO / base).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(tree: ast.AST, modules: set[str]) -> set[str]:
    """The project modules a module's import statements name, at any depth (imports inside functions count:
    they run too), except under ``if TYPE_CHECKING:``, which never runs. ``from pkg import name`` names
    ``pkg.name`` when that is a module, else ``pkg``."""
    names: set[str] = set()
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            continue
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names
            }
        names |= imported(node, modules)
    return names & modules


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imported(ast.parse(path.read_text()), set(modules)) - {name} for name, path in modules.items()}


def _entry(module: str) -> bool:
    return any(module == e or module.startswith(e + ".") for e in ENTRY)


def test_the_core_never_imports_an_entry_point():
    graph = import_graph()
    wrong = {m: sorted(d for d in deps if _entry(d)) for m, deps in graph.items() if not _entry(m)}
    assert {m: d for m, d in wrong.items() if d} == {}


def test_the_benchmark_and_the_dev_server_never_import_the_command_line():
    graph = import_graph()
    lower = [m for m in graph if m.startswith(("pipeline.bench", "pipeline.devtools"))]
    assert lower and {m: sorted(d for d in graph[m] if d.startswith("pipeline.cli")) for m in lower} == {
        m: [] for m in lower
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_git_ignores_no_source_file():
    """An ignore rule that catches a package (``outputs/`` once hid ``pipeline/outputs/``) would leave it out of
    every clone: CI and users would get a tree that cannot import."""
    sources = [str(p.relative_to(REPO)) for p in module_names().values()]
    ignored = subprocess.run(["git", "check-ignore", *sources], cwd=REPO, capture_output=True, text=True)
    assert ignored.stdout == "", ignored.stdout
