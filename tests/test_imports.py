"""The project's modules import each other in one direction only, and never inside a function or class."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def project_imports(root: Path) -> tuple[dict[str, set[str]], list[str]]:
    """({module: project modules it imports at module level}, ['file:line imports X inside a function']) for the
    top-level scripts in root. Imports under `if`/`try` at module level count as module level."""
    names = {p.stem for p in root.glob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in names}
    nested: list[str] = []

    def visit(node: ast.AST, module: str, inside: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found = [a.name.split(".")[0] for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found = [child.module.split(".")[0]]
            else:
                found = []
            for name in (f for f in found if f in names):
                if inside:
                    nested.append(f"{module}.py:{child.lineno} imports {name} inside a function or class")
                else:
                    graph[module].add(name)
            visit(child, module, inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                ast.ClassDef, ast.Lambda)))

    for name in names:
        visit(ast.parse((root / f"{name}.py").read_text()), name, False)
    return graph, nested


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := walk(dep)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := walk(node)):
            return cycle
    return None


def import_order(graph: dict[str, set[str]]) -> list[str]:
    """Every module after the modules it imports (ties by name)."""
    order: list[str] = []
    while len(order) < len(graph):
        order += sorted(m for m in graph if m not in order and graph[m] <= set(order))[:1]
    return order


# The programs people run; they import modules only, never one another (bench.py runs the others as programs).
SCRIPTS = {"train", "evaluate", "inference", "serve", "export", "split_dataset", "check_data", "baseline", "bench",
           "bench_serve"}


def scripts_imported(graph: dict[str, set[str]], scripts: set[str]) -> list[str]:
    """'a imports b' for every project module a that imports a script b."""
    return sorted(f"{a} imports {b}" for a, deps in graph.items() for b in deps & scripts)


def test_project_imports_run_one_way_and_only_at_module_level():
    graph, nested = project_imports(ROOT)
    assert nested == []
    assert find_cycle(graph) is None
    order = import_order(graph)
    assert order[0] == "common" and graph["common"] == set()  # the bottom: imports no project module
    assert order.index("checkpoint") < order.index("predict") < order.index("train")
    assert "dataset" not in graph["model"]  # the network does not pull in the cache and the layout reader


def test_scripts_import_modules_only():
    graph, _ = project_imports(ROOT)
    assert SCRIPTS <= set(graph)
    assert scripts_imported(graph, SCRIPTS) == []


def test_the_script_check_fails_when_a_script_imports_a_script(tmp_path):
    (tmp_path / "lib.py").write_text("import os\n")
    (tmp_path / "tool.py").write_text("import lib\n")
    (tmp_path / "runner.py").write_text("import lib\nfrom tool import main\n")
    graph, _ = project_imports(tmp_path)
    assert scripts_imported(graph, {"tool", "runner"}) == ["runner imports tool"]


def test_the_check_finds_cycles_and_imports_inside_functions(tmp_path):
    (tmp_path / "low.py").write_text("import os\n")
    (tmp_path / "a.py").write_text("import low\nfrom b import f\n")
    (tmp_path / "b.py").write_text("import low\n\ndef f():\n    from a import g  # hidden cycle\n    return g\n")
    graph, nested = project_imports(tmp_path)
    assert nested == ["b.py:4 imports a inside a function or class"]
    assert graph == {"low": set(), "a": {"low", "b"}, "b": {"low"}}
    assert find_cycle(graph) is None and import_order(graph) == ["low", "b", "a"]
    (tmp_path / "b.py").write_text("import low\nimport a.sub\n")
    graph, nested = project_imports(tmp_path)
    assert nested == [] and find_cycle(graph) == ["a", "b", "a"]


def test_the_readme_lists_the_modules_in_an_order_they_import_in():
    """README's module table: every module there, each importing only modules listed above it."""
    graph, _ = project_imports(ROOT)
    table = (ROOT / "README.md").read_text().split("| module | what it holds |", 1)[1].split("\n\n", 1)[0]
    listed = [name.strip(" `").removesuffix(".py") for row in table.splitlines()[2:]
              for name in row.split("|")[1].split(",")]
    assert set(listed) == set(graph) - SCRIPTS
    for i, module in enumerate(listed):
        assert graph[module] <= set(listed[:i]), f"{module} imports {graph[module] - set(listed[:i])} listed below it"
