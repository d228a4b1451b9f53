"""The package's shape, read from its source: Ray is imported only in the sweep's Ray side,
memray's modules import each other without a cycle, and models need no dataset code."""

from __future__ import annotations

import ast
import sys
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


# ---------------------------------------------------------------------------------------
# Each extension is one unit: its name is written in its own module(s) only
# ---------------------------------------------------------------------------------------

#: Registered names that are ordinary words (a loss, a reference, a full or local thing):
#: they may occur anywhere. Every other registered name is distinctive.
ORDINARY_NAMES = {"loss", "ref", "full", "head", "local"}


def _file(function: object) -> Path:
    return Path(sys.modules[function.__module__].__file__).resolve()  # type: ignore[attr-defined]


def unit_files() -> dict[str, set[Path]]:
    """Each registered method, attack and dataset -> the modules that make it: its config
    section and `apply` (methods), its scorers (attacks), its pool (datasets). A method
    option with a name of its own (DoRA, LoRA's) belongs to its method's unit."""
    from memray import attacks, data, methods

    units: dict[str, set[Path]] = {}
    for name in methods.METHODS:
        spec = methods.METHODS[name]
        units.setdefault(name, set()).update({_file(spec.config), _file(spec.apply)})
        for option in spec.config.model_fields:  # an option named like a unit of its own: dora
            if option in DISTINCTIVE_OPTIONS:
                units.setdefault(option, set()).update(units[name])
    for name in attacks.ATTACKS:
        spec = attacks.ATTACKS[name]
        units.setdefault(name, set()).update({_file(spec.score), *map(_file, spec.reference_scorers.values())})
    for name in data.REGISTRY:
        units.setdefault(name, set()).add(_file(data.REGISTRY[name].pool))
    return {name: files for name, files in units.items() if name not in ORDINARY_NAMES}


#: Method options that are methods in their own right in the literature (DoRA).
DISTINCTIVE_OPTIONS = {"dora"}


def distinctive_literals(source: str, names: set[str]) -> list[tuple[int, str]]:
    """(line, name) of every string literal in `source` that is one of `names` (a whole
    literal, or a whole constant part of an f-string)."""
    return [(node.lineno, node.value) for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names]


def test_the_literal_scan_finds_a_name_written_outside_its_unit():
    assert distinctive_literals('if method == "lora":\n    x = f"{a}"\n', {"lora"}) == [(1, "lora")]
    assert distinctive_literals('"""Text about lora."""\nname = "lorax"\n', {"lora"}) == []


def test_a_distinctive_name_is_written_in_its_own_unit_only():
    """No module but a method's, attack's or dataset's own names it as a string: what
    depends on which unit it is lives in the unit's registry entry (a unit's module may
    import another's names where a finding is about that unit)."""
    units = unit_files()
    assert {"lora", "dora", "ia3", "prefix", "prompt", "ptuning", "mink", "mink++", "zlib", "lira", "rmia",
            "wikitext2", "webnlg", "xsum"} <= set(units)
    outside = []
    for name, path in MODULES.items():
        for line, literal in distinctive_literals(path.read_text(), set(units)):
            if path.resolve() not in units[literal]:
                outside.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {literal!r}")
    assert outside == []


def test_command_line_entry_points_are_in_cli_only():
    """Every command is a `memray` subcommand: no other module parses arguments or runs as `-m`."""
    for name, path in MODULES.items():
        if name == "memray.cli":
            continue
        source = path.read_text()
        assert "argparse" not in imports(path) and '__name__ == "__main__"' not in source, name


# ---------------------------------------------------------------------------------------
# The README's Layout is the import graph
# ---------------------------------------------------------------------------------------


def readme_layers() -> list[list[str]]:
    """The layers of the README's Layout, top first: each a list of modules (`sweep/`: the
    package and every module in it)."""
    text = (PACKAGE.parent / "README.md").read_text()
    layout = text.split("\n## Layout", 1)[1]
    block = layout.split("checks every import of every\nmodule against it.", 1)[1].split("```")[1]
    layers = []
    for line in block.strip().splitlines():
        names = []
        for entry in line.split():
            package = entry.endswith("/")
            name = "memray." + entry.rstrip("/")
            names += [m for m in MODULES if m == name or (package and m.startswith(name + "."))]
        layers.append(names)
    return layers


def all_imports(path: Path) -> set[str]:
    """Every module `path` imports, `if TYPE_CHECKING:` blocks included."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def package(name: str) -> str:
    """`memray.sweep` for the modules of the sweep package (and the package itself); a
    top-level module is its own."""
    parts = name.split(".")
    return ".".join(parts[:2])


def test_the_readme_layout_lists_every_module_once():
    listed = [name for layer in readme_layers() for name in layer]
    assert sorted(listed) == sorted(m for m in MODULES if m != "memray"), "a module missing from the Layout, or twice"


def test_imports_go_down_the_readme_layout_type_only_imports_included():
    layer_of = {name: depth for depth, layer in enumerate(readme_layers()) for name in layer}
    upward = []
    for name, path in MODULES.items():
        if name == "memray":
            continue
        for target in all_imports(path):
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if not target.startswith("memray.") or target == name:
                continue
            if package(name) != package(target) and layer_of[target] <= layer_of[name]:
                upward.append(f"{name} imports {target}")
    assert upward == []
