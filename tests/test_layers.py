"""The package keeps the layering of DESIGN.md §1: data flows one way (client -> export ->
mapped device -> table -> target -> underlying device), so a module imports only modules of
its own layer or of layers below it, and no modules import each other, directly or round a
longer circle. Every import counts: at module level, inside functions, and under
TYPE_CHECKING."""

from __future__ import annotations

import ast
from pathlib import Path

import userdm

PACKAGE = Path(userdm.__file__).parent

#: lowest first; the top-level modules (userdm/__init__.py, inprocess.py, __main__.py) are the
#: public face above every layer, except errors.py and version.py, which every layer may use
LAYERS = ["errors", "block", "nbd", "dm", "targets", "export", "control", "cli"]
BOTTOM = {"errors", "version"}
TOP = len(LAYERS)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return TOP
    if parts[1] in BOTTOM:
        return 0
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else TOP


def imports(path: Path) -> set[str]:
    """The userdm modules that a file imports (a `from X import y` of a submodule names it)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "userdm"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "userdm":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if _exists(sub) else target)
    found.discard(me)
    return found


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").exists() or (PACKAGE / rel / "__init__.py").exists()


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_no_module_imports_a_higher_layer():
    upward = [f"{mod} ({LAYERS[layer(mod)] if layer(mod) < TOP else 'top'}) imports {dep} "
              f"({LAYERS[layer(dep)] if layer(dep) < TOP else 'top'})"
              for mod, deps in graph().items() for dep in sorted(deps) if layer(dep) > layer(mod)]
    assert upward == []


def test_no_import_circles():
    g = graph()
    # a package's __init__ importing its own submodules is how packages work; the circle
    # that matters is between modules, so a package imports nothing on behalf of its children
    edges = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in g.items()}
    circles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(edges.get(m, ())):
            if state.get(d) == 1:
                circles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert circles == []


def test_the_walker_sees_imports():
    """The checks above would pass on an empty graph: make sure they see real edges."""
    g = graph()
    assert "userdm.dm.mapped" in g["userdm.dm.mapper"]
    assert "userdm.block.device" in g["userdm.dm.target"]
    assert "userdm.export.nbd.server" in g["userdm.inprocess"]
    assert layer("userdm.export.nbd.server") > layer("userdm.dm.mapper") > layer("userdm.block.device")
