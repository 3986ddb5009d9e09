"""The package's shape: rooms by concern, imports that run one way, no circles.

Every import of an apirouter module counts, including those inside functions and under
``TYPE_CHECKING``: a circle of annotations is still two modules that cannot be read apart.
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).parent.parent / "apirouter"
# Bottom to top: a module may import its own room and the rooms below, never above.
LAYERS = ["apirouter", "config", "upstream", "state", "observe", "proxy", "server", "ops"]
ENTRY_POINTS = {"apirouter.wsgi", "apirouter.__main__"}  # the top: they start the router
TOP_LEVEL_LIMIT = 8


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str) -> set[str]:
    """The apirouter modules ``name`` imports (a package's submodule where one is named)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("apirouter")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("apirouter"):
            module = node.module or ""
            for alias in node.names:
                submodule = f"{module}.{alias.name}"
                found.add(submodule if submodule in MODULES else module)
    return {m for m in found if m != name} & MODULES.keys()


GRAPH = {name: _imports(name) for name in MODULES}


def _layer(name: str) -> int:
    if name in ENTRY_POINTS:
        return len(LAYERS)
    parts = name.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 2 else 0


def _cycle() -> list[str] | None:
    """One import circle, as the path that closes it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(GRAPH):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circles():
    cycle = _cycle()
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_imports_run_downward():
    upward = [
        f"{name} ({LAYERS[_layer(name)] if _layer(name) < len(LAYERS) else 'entry'}) imports "
        f"{dep} ({LAYERS[_layer(dep)] if _layer(dep) < len(LAYERS) else 'entry'})"
        for name, deps in sorted(GRAPH.items())
        for dep in sorted(deps)
        if _layer(dep) > _layer(name)
    ]
    assert not upward, "imports that run upward:\n" + "\n".join(upward)


def test_the_checks_see_the_whole_package():
    """The graph is read from every module: a sanity check on the checks above."""
    assert "apirouter.proxy.app" in GRAPH
    assert "apirouter.config.provider" in GRAPH["apirouter.proxy.app"]
    assert all(_layer(name) >= 0 for name in GRAPH)


def test_a_few_modules_at_the_top_the_rest_in_rooms():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    rooms = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
    assert len(top) <= TOP_LEVEL_LIMIT, top
    assert rooms == sorted(LAYERS[1:]), rooms


def test_the_app_stays_small():
    """The WSGI app orders a request's steps; the steps live in modules of their own."""
    tree = ast.parse(MODULES["apirouter.proxy.app"].read_text())
    app = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "App")
    assert (app.end_lineno or 0) - app.lineno + 1 <= 250
