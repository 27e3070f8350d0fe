"""The package's shape: the kernels stand alone, no two files import each other, files and steps stay small."""

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


def test_no_two_files_import_each_other():
    files = sorted(PACKAGE.rglob("*.py"))
    graph = {f: _imports(f) for f in files}
    assert graph[PACKAGE / "modules" / "distillation.py"], "the import graph came out empty: the walker is broken"
    mutual = sorted(
        f"{a.relative_to(PACKAGE)} <-> {b.relative_to(PACKAGE)}"
        for a in files
        for b in graph[a]
        if a in graph[b] and a < b
    )
    assert not mutual, f"files that import each other: {mutual}"


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
