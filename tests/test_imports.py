"""course_lib's import graph, read from the source (AST): no cycles, and training below inference.

Every import counts, also one inside a function (it runs when the function is called), except in an
``if __name__ == "__main__":`` block: importing the module never runs that (``python -m course_lib.train``
hands over to the command in course_lib/build_weights.py there).
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "course_lib"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_main_guard(node: ast.AST) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The course_lib modules that ``path`` imports (``from . import x`` counts as importing course_lib.x)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()

    def visit(node):
        if _is_main_guard(node):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)  # `from . import data` imports course_lib.data
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for m in graph[todo.pop()] - seen:
            seen.add(m)
            todo.append(m)
    return seen


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle as a list of modules (first == last), or None (depth-first search, three colours)."""
    state, stack = {}, []

    def dfs(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := dfs(n)):
                return cycle
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (cycle := dfs(m)):
            return cycle
    return None


def test_the_graph_is_read_from_the_source():
    graph = import_graph()
    assert {"course_lib.train", "course_lib.tiny_sd", "course_lib.viz.guidance"} <= set(graph)
    assert "course_lib.unet" in graph["course_lib.controlnet"]  # `from .unet import ...`
    assert "course_lib.data" in graph["course_lib.train"]  # `from . import data`
    assert "course_lib.evaluator" in graph["course_lib.viz.guidance"]  # `from ..evaluator import ...`


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_course_lib_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize("training", ["course_lib.train", "course_lib.controlnet_train"])
def test_training_does_not_import_inference(training):
    graph = import_graph()
    below = reachable(graph, training)
    inference = {m for m in below if m in ("course_lib.tiny_sd", "course_lib.diffusers_bridge")
                 or m == "course_lib.viz" or m.startswith("course_lib.viz.")}
    assert not inference, f"{training} imports {sorted(inference)} (directly or through another module)"
