"""The project's import graph has no circles, and trainers/ never imports tuning/ (the trainers
know nothing of Tune or of the search). Every import counts, at module level or inside a
function: a function-local import hides a circle from Python, not from a reader."""

from __future__ import annotations

import ast
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
PACKAGES = ("trainers", "tuning")


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """{module: the project modules it imports}, read with ast from root/<package>/*.py."""
    graph: dict[str, set[str]] = {}
    for package in packages:
        for path in sorted((root / package).glob("*.py")):
            module = f"{package}.{path.stem}"
            imported: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module] if node.module not in packages else [f"{node.module}.{a.name}" for a in node.names]
                    imported.update(n for n in names if n.split(".")[0] in packages)
                elif isinstance(node, ast.Import):
                    imported.update(a.name for a in node.names if a.name.split(".")[0] in packages)
            graph[module] = {name for name in imported if name != module and name.split(".")[-1] != "__init__"}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of two or more modules (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for other in graph.get(module, ()):
            if other not in graph:
                continue
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_the_project_has_no_import_circle():
    assert cycles(import_graph(PROJECT)) == []


def test_trainers_never_import_tuning():
    leaks = {module: sorted(n for n in imported if n.startswith("tuning"))
             for module, imported in import_graph(PROJECT).items() if module.startswith("trainers.")}
    assert {m: n for m, n in leaks.items() if n} == {}


def test_a_planted_circle_is_found_even_through_a_function_local_import(tmp_path):
    package = tmp_path / "tuning"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from tuning.b import thing\n")
    (package / "b.py").write_text("def thing():\n    from tuning import c\n")
    (package / "c.py").write_text("import tuning.a\n")
    (package / "d.py").write_text("from tuning.a import x\n")
    assert cycles(import_graph(tmp_path, ("tuning",))) == [["tuning.a", "tuning.b", "tuning.c"]]
