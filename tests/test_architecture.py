"""The shape of the house: modules import downward only, with no cycles; every run setting is
declared once (its flag is generated from the RunConfig field); functions fit on a screen."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "warmstart"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The warmstart modules `path` imports, at the top or inside functions."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")
            base = base[:len(base) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            names = [f"{target}.{a.name}" for a in node.names]
            found.update(n if (PACKAGE.parent / (n.replace(".", "/") + ".py")).is_file()
                         or (PACKAGE.parent / n.replace(".", "/")).is_dir() else target for n in names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("warmstart"):
            found.add(node.module)
    return found - {module}


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def test_no_module_imports_the_package_itself():
    upward = sorted(m for m, deps in _graph().items() if "warmstart" in deps and m != "warmstart")
    assert upward == []


def _edges() -> dict[str, set[str]]:
    """Who imports whom, with the package __init__ files Python runs on the way: importing `a.b.c`
    from outside the package `a.b` runs `a/b/__init__.py` first."""
    graph = _graph()
    edges = {}
    for module, deps in graph.items():
        own = {module.rsplit(".", i)[0] for i in range(module.count(".") + 1)}  # itself and its packages
        implied = {d.rsplit(".", i)[0] for d in deps for i in range(1, d.count(".") + 1)}
        edges[module] = {d for d in deps | (implied - own) if d in graph}
    return edges


def test_there_are_no_import_cycles():
    edges, cycles, state = _edges(), [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []
