"""The package's shape, read from its source: Ray is imported only in the sweep's Ray side,
memray's modules import each other without a cycle, and models need no dataset code."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "memray"
#: The only modules that may import Ray: the Tune side of a sweep and the Ray Train launcher.
RAY_MODULES = {"memray.sweep.ray_tune", "memray.sweep.ray_train"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of its code except `if TYPE_CHECKING:`
    blocks (annotations only, never run)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from memray import sweep`
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def memray_imports(name: str) -> set[str]:
    """The memray modules `name` imports (a submodule also imports its parent package)."""
    edges = set()
    for target in imports(MODULES[name]):
        while target and target not in MODULES:
            target = target.rpartition(".")[0]
        if target and target != name and target.startswith("memray"):
            edges.add(target)
    return edges


def test_ray_is_imported_only_by_the_sweeps_ray_side():
    importers = {name for name, path in MODULES.items()
                 if any(target == "ray" or target.startswith("ray.") for target in imports(path))}
    assert importers == RAY_MODULES


def test_memray_modules_import_each_other_without_a_cycle():
    graph = {name: memray_imports(name) for name in MODULES}
    # a package imports its own parts (memray.sweep -> memray.sweep.planning) and they the
    # package only for names it defines before importing them: not counted as a cycle
    graph = {name: {t for t in targets if not name.startswith(t + ".") and not t.startswith(name + ".")}
             for name, targets in graph.items()}
    state: dict[str, str] = {}

    def walk(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(target):], target]))
            if target not in state:
                walk(target, [*path, target])
        state[name] = "done"

    for name in MODULES:
        if name not in state:
            walk(name, [name])


def test_models_and_the_report_stay_in_their_lane():
    assert "memray.data" not in memray_imports("memray.models")  # the pretraining corpus is memray.corpus
    assert not any(t.startswith("memray.sweep") for t in memray_imports("memray.report"))
    assert "memray.cli" not in memray_imports("memray.bench")


#: Fixtures that start Ray (a test may also call ray.init itself).
RAY_FIXTURES = {"local_ray", "ray_3_cpus", "two_node_cluster"}


def test_every_test_that_starts_ray_carries_the_ray_marker():
    """`-m 'not ray'` runs the unit tests alone, `-m ray` the Ray integration tests."""
    unmarked = []
    for path in sorted((PACKAGE.parent / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text())
        module_marked = "pytestmark = pytest.mark.ray" in path.read_text()
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or not node.name.startswith("test_"):
                continue
            source = ast.get_source_segment(path.read_text(), node) or ""
            uses_ray = bool({arg.arg for arg in node.args.args} & RAY_FIXTURES) or "ray.init(" in source
            marked = module_marked or any("mark.ray" in ast.unparse(d) for d in node.decorator_list)
            if uses_ray and not marked:
                unmarked.append(f"{path.name}::{node.name}")
    assert unmarked == []
