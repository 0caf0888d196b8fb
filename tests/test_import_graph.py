"""The library's import graph, read from its source: no import cycle anywhere, and kernels/ at the bottom.

Every ``import`` and ``from ... import`` counts, at module level or inside a function (a deferred import
still ties the two modules together), and a package's ``__init__`` is a module of its own. A cycle names
its modules; so does a kernel that imports from above.
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"fastdfd": REPO / "fastdfd", "fastdfd.kernels": REPO / "kernels"}


def _modules() -> dict[str, Path]:
    mods = {}
    for package, base in ROOTS.items():
        for path in base.rglob("*.py"):
            parts = [package, *path.relative_to(base).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = path
    return mods


def _targets(module: str, node: ast.AST, is_package: bool, mods: dict) -> list[str]:
    """The modules an import statement loads. ``from P import m`` where ``P.m`` is a module loads ``P.m`` (P,
    a package above it, is initialised before any of its modules anyway); ``from P import name`` loads P."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:  # relative: climb from this module's package
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module
    return [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in mods else prefix for a in node.names]


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                deps |= {t for t in _targets(name, node, path.name == "__init__.py", mods) if t in mods and t != name}
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iteratively)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycle_in_the_library():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_kernels_are_the_bottom_layer():
    """The kernels and their launchers import nothing of the library above them. (kernels/tools/, the AOT
    compile scripts, read the generator's architecture constants to list the configurations to build: a
    developer's tool over the whole library, not a layer of it.)"""
    graph = import_graph()
    upward = {m: sorted(d for d in deps if not d.startswith("fastdfd.kernels"))
              for m, deps in graph.items()
              if m.startswith("fastdfd.kernels") and not m.startswith("fastdfd.kernels.tools")}
    assert {m: d for m, d in upward.items() if d} == {}


def test_the_tap_does_not_name_the_matcher():
    assert "fastdfd.nn.matcher" not in import_graph()["fastdfd.nn.tap"]
