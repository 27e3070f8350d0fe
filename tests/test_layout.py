"""The package's shape: rooms on floors with imports running down, no cycles, files and steps stay small, and the
map of the rooms in CONTRIBUTING.md in step with the tree."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lit_distill"
#: files allowed past MAX_LINES: the Triton kernels, whose jit functions cannot be split across files cheaply
KERNEL_FILES = {"kernels/triton_backend.py"}
MAX_LINES = 300
MAX_TOP_LEVEL_FILES = 8
#: the floors, bottom first: a room (a subpackage, or a top-level file by its stem) imports only from rooms on
#: lower floors and from itself. ``lit_distill/__init__.py`` is the façade above them all (its imports are lazy).
FLOORS = (
    ("kernels",),
    ("losses", "models", "sharding", "checkpoints", "reporting"),
    ("data",),
    ("modules",),
    ("callbacks",),
    ("demo",),
    ("cli",),
)


def _module_file(name: str) -> Path | None:
    """The file of ``lit_distill`` module ``name`` (dotted), or None outside the package."""
    parts = name.split(".")
    if parts[0] != "lit_distill":
        return None
    base = PACKAGE.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _imports(path: Path) -> set[Path]:
    """Package files that ``path`` imports anywhere, function-level (lazy) imports included."""
    package = ".".join(("lit_distill", *path.relative_to(PACKAGE).with_suffix("").parts))
    if path.name == "__init__.py":
        package = package.rsplit(".", 1)[0]
        package_parts = package.split(".")
    else:
        package_parts = package.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package_parts[: len(package_parts) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from . import x` names a module; `from .m import f` names the module m
            names = [f"{base}.{alias.name}" for alias in node.names if _module_file(f"{base}.{alias.name}")] or [base]
        else:
            continue
        found.update(f for f in map(_module_file, names) if f is not None and f != path)
    return found


def _graph() -> dict[Path, set[Path]]:
    return {f: _imports(f) for f in sorted(PACKAGE.rglob("*.py"))}


def _room(path: Path) -> str:
    """The room of a package file: its top-level subpackage, or a top-level file's stem."""
    first = path.relative_to(PACKAGE).parts[0]
    return first.removesuffix(".py")


def _floor(room: str) -> int | None:
    return next((level for level, rooms in enumerate(FLOORS) if room in rooms), None)


def upward_imports(graph: dict[Path, set[Path]]) -> list[str]:
    """Imports from a room to a room on a higher floor (or on a room no floor names), as ``a -> b`` lines."""
    found = []
    for a, targets in graph.items():
        if a == PACKAGE / "__init__.py":
            continue
        for b in targets:
            ra, rb = _room(a), _room(b)
            fa, fb = _floor(ra), _floor(rb)
            if ra != rb and (fa is None or fb is None or fb >= fa):
                found.append(f"{a.relative_to(PACKAGE)} -> {b.relative_to(PACKAGE)}")
    return sorted(found)


def import_cycles(graph: dict[Path, set[Path]]) -> list[list[str]]:
    """Every strongly connected set of more than one file (files importing each other, through any path)."""
    index: dict[Path, int] = {}
    low: dict[Path, int] = {}
    stack: list[Path] = []
    cycles = []

    def visit(node: Path) -> None:  # Tarjan's algorithm; the package is small enough for recursion
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(str(member.relative_to(PACKAGE)))
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return cycles


def test_no_import_cycles():
    graph = _graph()
    assert graph[PACKAGE / "modules" / "distillation.py"], "the import graph came out empty: the walker is broken"
    assert not import_cycles(graph), f"files that import each other (through any path): {import_cycles(graph)}"


def test_imports_run_down_the_floors():
    """cli -> demo -> callbacks -> modules -> data -> losses, models, ... -> kernels, and never back up."""
    rooms = {_room(f) for f in PACKAGE.rglob("*.py")} - {"__init__"}
    assert not rooms - set().union(*FLOORS), f"rooms on no floor (add them to FLOORS): {rooms - set().union(*FLOORS)}"
    assert not upward_imports(_graph()), f"imports that run back up the floors: {upward_imports(_graph())}"


def test_data_knows_no_command_line_and_no_technique():
    """The data room, the teacher cache included, imports nothing from the command line, the demo, the
    callbacks or the modules (the cache-teacher command lives in cli/)."""
    above = {"cli", "demo", "callbacks", "modules"}
    bad = sorted(
        f"{a.relative_to(PACKAGE)} -> {b.relative_to(PACKAGE)}"
        for a, targets in _graph().items()
        if _room(a) == "data"
        for b in targets
        if _room(b) in above
    )
    assert not bad, bad


def test_few_files_at_the_top():
    top = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert len(top) <= MAX_TOP_LEVEL_FILES, f"{len(top)} files at the top of lit_distill/ (give them rooms): {top}"


def test_layout_checks_can_fail(tmp_path, monkeypatch):
    """An import back up the floors and a cycle of three files are both reported."""
    fake = tmp_path / "lit_distill"
    for room in ("kernels", "modules", "callbacks"):
        (fake / room).mkdir(parents=True)
        (fake / room / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("")
    (fake / "modules" / "step.py").write_text("from ..callbacks.timer import Timer\n")
    (fake / "callbacks" / "timer.py").write_text("Timer = object\n")
    (fake / "kernels" / "a.py").write_text("from .b import f\n")
    (fake / "kernels" / "b.py").write_text("from .c import f\n")
    (fake / "kernels" / "c.py").write_text("def f():\n    from . import a\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    graph = _graph()
    assert upward_imports(graph) == ["modules/step.py -> callbacks/timer.py"]
    assert import_cycles(graph) == [["kernels/a.py", "kernels/b.py", "kernels/c.py"]]


def test_import_graph_sees_a_mutual_import(tmp_path, monkeypatch):
    """The check above can fail: two files that import each other are reported."""
    fake = tmp_path / "lit_distill"
    (fake / "sub").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "sub" / "__init__.py").write_text("")
    (fake / "sub" / "a.py").write_text("from .b import f\n")
    (fake / "sub" / "b.py").write_text("def f():\n    from . import a\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert _imports(fake / "sub" / "a.py") == {fake / "sub" / "b.py"}
    assert _imports(fake / "sub" / "b.py") == {fake / "sub" / "a.py"}


def test_kernels_import_no_lightning():
    code = (
        "import sys, lit_distill.kernels, lit_distill.losses;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning'));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, f"importing the kernels imported Lightning: {proc.stdout}{proc.stderr}"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_files_stay_small(path):
    if str(path.relative_to(PACKAGE)) in KERNEL_FILES:
        pytest.skip("Triton kernel files hold their jit functions, launchers and Function together")
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE)} has {lines} lines (> {MAX_LINES}): split it by job"


def test_training_steps_are_short():
    from lit_distill import modules

    steps = {
        cls.__name__: cls.training_step
        for cls in vars(modules).values()
        if inspect.isclass(cls) and "training_step" in vars(cls)
    }
    assert steps, "no module defines training_step"
    for name, step in steps.items():
        lines = len(inspect.getsource(step).splitlines())
        assert lines <= 15, f"{name}.training_step has {lines} lines"


def test_one_version_source():
    import importlib.metadata

    import lit_distill

    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"], "the version is written in pyproject.toml"
    assert importlib.metadata.version("lit-distill") == lit_distill.__version__
