"""The packages of expertune form layers: no package imports another that (directly or through others) imports
it back. Read from the source (every `from expertune.X...` / `import expertune.X...`, lazy ones included)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import expertune

ROOT = Path(expertune.__file__).parent


def unit_of(module: str) -> str:
    """The layer unit of a dotted module: its subpackage (`expertune.train.loop` → train) or top-level module."""
    return module.split(".")[1]


def package_graph(root: Path = ROOT) -> dict[str, dict[str, set[str]]]:
    """unit → imported unit → the modules of the unit that import it."""
    graph: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for path in sorted(root.rglob("*.py")):
        module = ".".join(("expertune", *path.relative_to(root).with_suffix("").parts))
        if module.endswith(".__init__"):
            module = module[: -len(".__init__")]
        if module == "expertune":
            continue
        source = unit_of(module)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                if name.startswith("expertune.") and unit_of(name) != source:
                    graph[source][unit_of(name)].add(module)
    return graph


def cycles(graph: dict[str, dict[str, set[str]]]) -> list[list[str]]:
    """Every strongly connected group of more than one unit (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_package_imports_one_that_imports_it_back() -> None:
    graph = package_graph()
    assert {"train", "validate", "data", "cache", "world", "demo", "objective"} <= set(graph)  # the scan sees them
    problems = []
    for group in cycles(graph):
        edges = [f"{a} → {b} ({', '.join(sorted(graph[a][b]))})" for a in group for b in group if b in graph[a]]
        problems.append("; ".join(edges))
    assert not problems, "import cycles between packages:\n" + "\n".join(problems)


def test_the_scan_finds_a_cycle(tmp_path: Path) -> None:
    """The checker itself: two packages importing each other (one lazily, inside a function) are a cycle."""
    for name, other in (("low", "high"), ("high", "low")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
        (tmp_path / name / "mod.py").write_text(f"def f():\n    from expertune.{other}.mod import f\n")
    (tmp_path / "ground.py").write_text("import expertune.low.mod\n")
    assert cycles(package_graph(tmp_path)) == [["high", "low"]]
