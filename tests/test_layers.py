"""The package's imports run one way (docs/architecture.md, "The layers"): no module reaches back up to one that
reaches it, and each layer imports only its own row of the table and the rows above it (the lower layers).

The graph is read from the source (every ``import`` and ``from ... import``, at the top of a module or inside a
function alike: an import deferred to keep a job's start cheap is still a dependency). The package's root module is
left out: its ``__getattr__`` hands on ``batchscope.Workload`` and ``ALGORITHM_VERSIONS`` lazily, a face, not a
layer."""

import ast
import graphlib
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# docs/architecture.md's layer table: what each subpackage may import from batchscope, itself included
ALLOWED = {
    "core": {"core"},
    "workloads": {"workloads", "core", "config", "store", "faults"},
    "engine": {"engine", "workloads", "core", "config", "store", "faults"},
    "measure": {"measure", "engine", "workloads", "core", "config", "store", "faults"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that the module ``name`` imports (``from P import m`` names module P.m where it is one)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names)
    return {m for m in found if m in known and m != name}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in (SRC / "batchscope").rglob("*.py")}
    known = set(paths)
    return {name: imported(name, path, known) - {"batchscope"} for name, path in paths.items() if name != "batchscope"}


def test_the_graph_is_read(graph):
    # known arrows, so that an empty graph (a parser that sees nothing) cannot pass the tests below
    assert "batchscope.stages.fit" in graph["batchscope.stages.extend"]
    assert "batchscope.core.selection" in graph["batchscope.stages.train"]  # a top-level import
    assert "batchscope.store" in graph["batchscope.workloads.base"]  # an import inside a function
    assert "batchscope.core.jensen" in graph["batchscope.core.noise"]  # one within a layer
    assert len(graph) > 40


def test_no_import_circles(graph):
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as err:
        pytest.fail(f"an import circle: {' -> '.join(err.args[1])}")


def test_relative_imports_are_resolved(tmp_path):
    """The package has none today; one added must still draw its arrow."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    for name in ("__init__.py", "a.py", "sub/__init__.py", "sub/b.py"):
        (package / name).write_text("")
    (package / "sub" / "c.py").write_text(
        "from . import b\nfrom .. import a\nfrom ..sub.b import f\n\ndef g():\n    from pkg import a  # deferred\n"
    )
    known = {"pkg", "pkg.a", "pkg.sub", "pkg.sub.b", "pkg.sub.c"}
    assert imported("pkg.sub.c", package / "sub" / "c.py", known) == {"pkg.sub.b", "pkg.a"}
    (package / "sub" / "__init__.py").write_text("from .b import f\nfrom . import c\n")
    assert imported("pkg.sub", package / "sub" / "__init__.py", known) == {"pkg.sub.b", "pkg.sub.c"}


def test_a_circle_is_caught():
    with pytest.raises(graphlib.CycleError):
        tuple(graphlib.TopologicalSorter({"a": {"b"}, "b": {"c"}, "c": {"a"}}).static_order())


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_the_rows_above_it(graph, layer):
    reached = {
        (name, target)
        for name, targets in graph.items()
        if name.split(".")[1] == layer
        for target in targets
        if target.split(".")[1] not in ALLOWED[layer]
    }
    assert not reached, f"{layer} imports from a row below its own: {sorted(reached)}"
