"""The rooms' import rules (docs/ARCHITECTURE.md): arrows point down only (launcher -> engine ->
data_pipeline), the kernels import only torch and triton, no project module imports another inside
a function (that is how import cycles hide), and there is no import cycle between modules."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("launcher", "engine", "data_pipeline")
LAYER = {"launcher": 2, "engine": 1, "data_pipeline": 0}
KERNELS = "engine.kernels"
OPTIONAL_BACKENDS = {
    "engine.kernels.row_cross_entropy_triton": "imports triton, which CPU-only installs lack: loaded only when "
                                               "the triton backend is chosen",
}
"""Project modules that may be imported inside a function, and why (never to dodge a cycle)."""
LATE_IMPORTERS = {
    "launcher.run": "the entry point: it installs signal handlers and, for --dry-run, points stdout at stderr "
                    "before engine and DeepSpeed (which prints on import) load; --help-config stays fast",
}
"""Modules that may import project modules inside functions, and why."""


def module_name(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules(root: Path = REPO) -> dict[str, Path]:
    return {module_name(p, root): p for package in PACKAGES for p in sorted((root / package).rglob("*.py"))}


def imports(path: Path, module: str) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import of the file; relative imports
    resolved against `module`."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = module.split(".")[: -child.level] if not path.name == "__init__.py" else \
                        module.split(".")[: len(module.split(".")) - child.level + 1]
                    name = ".".join(base + ([child.module] if child.module else []))
                else:
                    name = child.module or ""
                found.append((name, child.lineno, in_function))
                found.extend((f"{name}.{alias.name}", child.lineno, in_function) for alias in child.names)
            visit(child, nested)

    visit(tree, False)
    return found


def _project_target(name: str, modules: dict[str, Path]) -> str | None:
    """The project module an import name refers to (the longest known prefix), or None."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def violations(root: Path = REPO) -> list[str]:
    modules = project_modules(root)
    out: list[str] = []
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for name, line, in_function in imports(path, module):
            target = _project_target(name, modules)
            where = f"{path.relative_to(root)}:{line}"
            top = name.split(".")[0]
            if module.startswith(KERNELS) and top not in ("torch", "triton", "__future__", "engine") \
                    and top not in sys.stdlib_module_names:
                out.append(f"{where}: the kernels import only torch and triton, not {name}")
            if target is None or target == module:
                continue
            if module.startswith(KERNELS) and not target.startswith(KERNELS):
                out.append(f"{where}: the kernels import only torch, triton and each other, not {target}")
            if LAYER[target.split(".")[0]] > LAYER[module.split(".")[0]]:
                out.append(f"{where}: {module} imports {target}, against the arrows launcher -> engine -> data_pipeline")
            if not in_function:
                graph[module].add(target)
            elif target not in OPTIONAL_BACKENDS and module not in LATE_IMPORTERS:
                out.append(f"{where}: {module} imports {target} inside a function")
    out.extend(f"import cycle: {' -> '.join(cycle)}" for cycle in _cycles(graph))
    return list(dict.fromkeys(out))  # `from a import b` names a and a.b: one report


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component that has one (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component) + [sorted(component)[0]])

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return cycles


def test_the_import_rules_hold():
    assert violations() == []


@pytest.mark.parametrize("source, expected", [
    ({"data_pipeline/low.py": "import engine.high\n", "engine/high.py": ""}, "against the arrows"),
    ({"engine/kernels/k.py": "import numpy\n"}, "the kernels import only torch and triton"),
    ({"engine/a.py": "def f():\n    from engine import b\n", "engine/b.py": ""}, "inside a function"),
    ({"engine/a.py": "from engine import b\n", "engine/b.py": "from engine import a\n"}, "import cycle"),
])
def test_a_reversed_arrow_is_caught(tmp_path, source, expected):
    """The rule test fails when an arrow is reversed on purpose."""
    for package in PACKAGES + (f"{KERNELS.replace('.', '/')}",):
        (tmp_path / package).mkdir(parents=True, exist_ok=True)
        (tmp_path / package / "__init__.py").write_text("")
    for name, text in source.items():
        (tmp_path / name).write_text(text)
    found = violations(tmp_path)
    assert any(expected in v for v in found), found
