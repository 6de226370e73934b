"""cpb/ has no import cycle: the client modules, the local cloud (cpb/local) and the demo (cpb/demo)
depend on each other in one direction only.

The graph is read from the source (every `import` / `from ... import`, at module level or inside a
function, since a function-level import still ties the two modules together), so a cycle fails here
before it can bite at run time.
"""
from __future__ import annotations

import ast
from pathlib import Path

CPB = Path(__file__).resolve().parent.parent / "cpb"


def module_name(path: Path, root: Path = CPB) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = CPB) -> dict[str, set[str]]:
    """module -> the cpb modules it imports (a package import counts as its __init__)."""
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_in_cpb():
    graph = import_graph()
    assert "cpb.cli" in graph and "cpb.local.up" in graph  # the graph is really read
    assert cycles(graph) == [], "import cycle(s) in cpb/: break them so imports go one way"


def test_the_demo_and_the_local_cloud_do_not_import_the_cli():
    graph = import_graph()
    for name, imports in graph.items():
        if name.startswith(("cpb.demo", "cpb.local")) and name != "cpb.local.commands":
            assert "cpb.cli" not in imports, f"{name} imports cpb.cli: run `cpb` commands as a user would"


def test_the_cycle_finder_finds_a_cycle(tmp_path):
    package = tmp_path / "cpb"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from cpb import b\n")
    (package / "b.py").write_text("def f():\n    from .sub import c\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "c.py").write_text("import cpb.a\n")
    (package / "d.py").write_text("import cpb.a\n")
    assert cycles(import_graph(package)) == [["cpb.a", "cpb.b", "cpb.sub.c"]]
