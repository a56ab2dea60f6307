"""The package's shape: parts depend one way, and no modules import each
other in a circle (lazy imports and type-checking imports count too)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def _modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / "atoll").rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The atoll modules ``name`` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            for alias in node.names:
                child = f"{target}.{alias.name}"
                found.add(child if child in modules else target)
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and not parts[1].startswith("_")) else ""


def test_parts_depend_one_way() -> None:
    """actors -> transport, tensors, venvs; none of those imports actors."""
    wrong = [
        f"{module} imports {dep}"
        for module, deps in _graph().items()
        for dep in deps
        if _part(module) in ("tensors", "venvs", "transport") and _part(dep) == "actors"
    ]
    assert wrong == []


def test_no_import_circles() -> None:
    # Packages' __init__ modules are facades that re-export their parts; the
    # parts themselves must form no circle.
    modules = _modules()
    graph = {
        name: {dep for dep in deps if modules[dep].name != "__init__.py"}
        for name, deps in _graph().items()
        if modules[name].name != "__init__.py"
    }
    circles = [component for component in _strongly_connected(graph) if len(component) > 1]
    assert circles == []


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in graph.get(node, ()):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


MODULE_LINES = 530
"""The most lines a module may have: about 500, one job's worth."""
_BIGGER = {
    # One concept: the socket's rules (one reader on an edge-triggered
    # descriptor, synchronous catch-up by senders, workers taking turns)
    # hold only together, as its docstring says.
    "atoll.transport._socket": 560,
    # The public Host: its methods' docstrings are the API's documentation,
    # and each method hands its work to the part that does it.
    "atoll.actors._host": 560,
}
"""Modules allowed more."""


def test_each_module_is_one_jobs_size_and_says_what_it_is() -> None:
    too_big, silent = [], []
    for name, path in _modules().items():
        text = path.read_text()
        lines = text.count("\n")
        if lines > _BIGGER.get(name, MODULE_LINES):
            too_big.append(f"{name}: {lines} lines")
        if not ast.get_docstring(ast.parse(text)):
            silent.append(name)
    assert too_big == []
    assert silent == []
