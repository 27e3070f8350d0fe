"""CONTRIBUTING.md's map of the rooms names every package and top-level file of lit_distill, and nothing else."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lit_distill"


def mapped_paths(contributing: str) -> set[str]:
    """The ``lit_distill/...`` paths that start the map's lines (every such path before the line's first colon)."""
    section = contributing.split("## Map of the rooms", 1)[1].split("\n## ", 1)[0]
    paths = set()
    for line in section.splitlines():
        if line.startswith("- `lit_distill/"):
            head = line.split("`:", 1)[0] + "`"
            paths |= set(re.findall(r"`(lit_distill/[^`]+)`", head))
    return paths


def tree_paths(package: Path) -> set[str]:
    """Every subpackage (``lit_distill/x/``, nested ones too) and top-level file but ``__init__.py``."""
    packages = {f"{p.parent.relative_to(package.parent).as_posix()}/" for p in package.rglob("__init__.py")}
    files = {f"lit_distill/{p.name}" for p in package.glob("*.py") if p.name != "__init__.py"}
    return (packages | files) - {"lit_distill/"}


def test_the_map_names_every_room():
    mapped = mapped_paths((ROOT / "CONTRIBUTING.md").read_text())
    tree = tree_paths(PACKAGE)
    assert "lit_distill/kernels/" in mapped, "the map came out empty: its heading or line format changed"
    assert not tree - mapped, f"rooms missing from CONTRIBUTING.md's map: {sorted(tree - mapped)}"
    assert not mapped - tree, f"the map names rooms that are not there: {sorted(mapped - tree)}"


def test_a_room_missing_from_the_map_fails(tmp_path):
    """The check sees a new package that the map leaves out, and a mapped one that is gone."""
    fake = tmp_path / "lit_distill"
    for room in ("kernels", "prepare"):
        (fake / room).mkdir(parents=True)
        (fake / room / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("")
    (fake / "losses.py").write_text("")
    text = "## Map of the rooms\n\n- `lit_distill/kernels/`: x\n- `lit_distill/losses.py`, `lit_distill/gone.py`: y\n"
    mapped, tree = mapped_paths(text), tree_paths(fake)
    assert tree - mapped == {"lit_distill/prepare/"}
    assert mapped - tree == {"lit_distill/gone.py"}
