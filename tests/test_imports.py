"""The project's modules import each other in one direction only (README "The code"), never inside a function or
class, and no module imports a script."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Bottom to top: a module imports modules of its own layer or of the layers below it, never above.
LAYERS = ("core", "config", "loading", "model dataset", "prediction", "training", "quality",
          "train inference evaluate serve export check_data split_dataset", "benchmarks")
# The programs people run; nothing imports them (benchmarks run them as programs).
SCRIPTS = {"train", "inference", "evaluate", "serve", "export", "check_data", "split_dataset"}
TOP_LEVEL = SCRIPTS | {"model", "dataset", "config"}


def module_names(root: Path) -> dict[str, Path]:
    """{dotted module name: file} for the .py files at root and in its packages (folders with __init__.py)."""
    found = {p.stem: p for p in root.glob("*.py")}
    for init in root.glob("*/__init__.py"):
        found |= {f"{init.parent.name}.{p.stem}": p for p in init.parent.glob("*.py") if p.stem != "__init__"}
    return found


def project_imports(root: Path) -> tuple[dict[str, set[str]], list[str]]:
    """({module: project modules it imports at module level}, ['file:line imports X inside a function']).
    Imports under `if`/`try` at module level count as module level; `from pkg import mod` imports pkg.mod."""
    files = module_names(root)
    graph: dict[str, set[str]] = {name: set() for name in files}
    nested: list[str] = []

    def targets(node: ast.AST) -> set[str]:
        if isinstance(node, ast.Import):
            return {a.name for a in node.names if a.name in files}
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            return {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                    for a in node.names} & set(files)
        return set()

    def visit(node: ast.AST, module: str, inside: bool) -> None:
        for child in ast.iter_child_nodes(node):
            for name in sorted(targets(child)):
                if inside:
                    nested.append(f"{files[module].relative_to(root)}:{child.lineno} imports {name} inside a "
                                  "function or class")
                elif name != module:
                    graph[module].add(name)
            visit(child, module, inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                ast.ClassDef, ast.Lambda)))

    for name, path in files.items():
        visit(ast.parse(path.read_text()), name, False)
    return graph, nested


def layer_of(module: str) -> int:
    """The index in LAYERS of a module: its package's, or its own name's at the top level."""
    key = module.split(".")[0]
    return next(i for i, layer in enumerate(LAYERS) if key in layer.split())


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """'a imports b' for every import of a module from a higher layer, or of a script by anything."""
    return sorted(f"{a} imports {b}" for a, deps in graph.items() for b in deps
                  if layer_of(b) > layer_of(a) or b in SCRIPTS)


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


def test_project_imports_run_one_way_and_only_at_module_level():
    graph, nested = project_imports(ROOT)
    assert nested == []
    assert find_cycle(graph) is None
    assert upward_imports(graph) == []
    assert graph["core.common"] == set()  # the bottom: imports no project module
    assert "dataset" not in graph["model"]  # the network does not pull in the cache and the layout reader


def test_the_top_level_holds_the_scripts_and_the_card_modules_only():
    assert {p.stem for p in ROOT.glob("*.py")} == TOP_LEVEL
    graph, _ = project_imports(ROOT)
    assert all(layer_of(m) is not None for m in graph)  # every package has its layer


def test_the_layer_check_fails_on_an_upward_import_and_a_script_import(tmp_path):
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "__init__.py").write_text("")
    (tmp_path / "core" / "low.py").write_text("import os\nfrom loading import reader\n")
    (tmp_path / "loading").mkdir()
    (tmp_path / "loading" / "__init__.py").write_text("")
    (tmp_path / "loading" / "reader.py").write_text("from core.low import x\n")
    (tmp_path / "train.py").write_text("from loading.reader import y\n")
    (tmp_path / "evaluate.py").write_text("import train\n")
    graph, nested = project_imports(tmp_path)
    assert graph == {"core.low": {"loading.reader"}, "loading.reader": {"core.low"}, "train": {"loading.reader"},
                     "evaluate": {"train"}}
    assert upward_imports(graph) == ["core.low imports loading.reader", "evaluate imports train"]
    assert find_cycle(graph) == ["core.low", "loading.reader", "core.low"]


def test_the_check_finds_imports_inside_functions(tmp_path):
    (tmp_path / "config.py").write_text("import os\n")
    (tmp_path / "model.py").write_text("import config\n\ndef f():\n    from dataset import g  # hidden upward\n")
    (tmp_path / "dataset.py").write_text("import config\n")
    graph, nested = project_imports(tmp_path)
    assert nested == ["model.py:4 imports dataset inside a function or class"]
    assert graph == {"config": set(), "model": {"config"}, "dataset": {"config"}}


def test_the_readme_shows_every_package_and_top_level_module():
    """README's tree in "The code": every top-level .py file and every package is named there."""
    section = (ROOT / "README.md").read_text().split("## The code", 1)[1].split("\n## ", 1)[0]
    packages = {init.parent.name for init in ROOT.glob("*/__init__.py")}
    missing = [name for name in sorted(TOP_LEVEL) if f"{name}.py" not in section]
    missing += [name for name in sorted(packages) if f"{name}/" not in section]
    assert missing == []
