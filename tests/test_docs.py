"""Docs that cannot rot: README.md and docs/*.md are checked like code.

- Python blocks marked runnable run. The marker is the HTML comment ``<!-- runnable -->`` on the line right
  before a ```` ```python ```` fence (GitHub does not render it). A page's runnable blocks run in order in one
  namespace, in a fresh process and a temporary directory; a failing block is named by page and line. Keep them
  tiny (a few seconds on a CPU); examples that need a real checkpoint, a GPU or a download stay unmarked.
- ```` ```yaml ```` blocks parse with ``yaml.safe_load``.
- Relative links ``[text](path)``, ``[text](path#anchor)`` and ``[text](#anchor)`` in these pages and in
  CONTRIBUTING.md reach a file that exists and, for an anchor, a heading with that GitHub slug.
- Names written as ``lit_distill.x.Y`` in backticks (and the ``class_path:`` values of yaml blocks) import, and
  file paths such as ``lit_distill/kernels/functional.py`` in backticks exist: a rename or a move fails here.

Each checker is a plain function of a page's text; the last tests feed them broken pages to show they fail.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINKED_PAGES = [*PAGES, ROOT / "CONTRIBUTING.md"]
MARKER = "<!-- runnable -->"


def _name(path: Path) -> str:
    """A page's name in messages: relative to the repository where it lies there."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


# ------------------------------------------------------------------------------------------ parsing a page
@dataclass(frozen=True)
class Block:
    """A fenced code block: ``line`` is the page's line (1-based) of its first line of code."""

    page: str
    line: int
    lang: str
    code: str
    runnable: bool


OPENING_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")


def code_blocks(text: str, page: str = "<page>") -> list[Block]:
    """Every fenced code block of a markdown page (nested longer fences included as one block)."""
    lines = text.split("\n")
    blocks, i = [], 0
    while i < len(lines):
        opening = OPENING_FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence = opening.group(2)
        closing = re.compile(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        end = next((j for j in range(i + 1, len(lines)) if closing.match(lines[j])), len(lines))
        runnable = i > 0 and lines[i - 1].strip() == MARKER
        code = textwrap.dedent("\n".join(lines[i + 1 : end]))
        blocks.append(Block(page, i + 2, opening.group(3).lower(), code, runnable))
        i = end + 1
    return blocks


def prose(text: str) -> str:
    """The page without its code blocks and HTML comments, line numbers kept (blanked lines stay)."""
    lines = text.split("\n")
    for block in code_blocks(text):
        start, length = block.line - 2, len(block.code.split("\n")) + 2
        lines[start : start + length] = [""] * len(lines[start : start + length])
    out = "\n".join(lines)
    return re.sub(r"<!--.*?-->", lambda m: re.sub(r"[^\n]", " ", m.group()), out, flags=re.DOTALL)


INLINE_CODE = re.compile(r"`((?:[^`\n]|\n(?![ \t]*\n))+?)`")


def inline_code(text: str) -> list[tuple[int, str]]:
    """(line, content) of each inline code span outside code blocks."""
    text = prose(text)
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in INLINE_CODE.finditer(text)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: links read as their text, lowercase, punctuation dropped except hyphens
    and underscores, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor a page offers: its headings' slugs (a repeated slug gets -1, -2, ...) and explicit ids."""
    found: dict[str, int] = {}
    result = set()
    for match in re.finditer(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", prose(text), flags=re.MULTILINE):
        base = slug(match.group(1))
        count = found.get(base, 0)
        found[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    result |= set(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", text))
    return result


# ------------------------------------------------------------------------------------------ the checkers
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^()\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def broken_links(text: str, page: Path) -> list[str]:
    """Each relative link of ``text`` (the page at ``page``) whose file or anchor does not exist."""
    visible = INLINE_CODE.sub(lambda m: re.sub(r"[^\n]", " ", m.group()), prose(text))
    problems = []
    for match in LINK.finditer(visible):
        target = match.group(1)
        if re.match(r"^([a-z][a-z0-9+.-]*:|//)", target, flags=re.IGNORECASE):
            continue  # http:, https:, mailto:, ...
        where = f"{_name(page)}:{visible.count(chr(10), 0, match.start()) + 1}"
        path_part, _, anchor = target.partition("#")
        destination = (page.parent / path_part).resolve() if path_part else page
        if path_part and not destination.exists():
            problems.append(f"{where}: link to {target}: there is no {path_part}")
        elif anchor and destination.suffix == ".md":
            page_text = text if destination == page else destination.read_text()
            if anchor not in anchors(page_text):
                problems.append(f"{where}: link to {target}: {_name(destination)} has no heading #{anchor}")
    return problems


def dotted_names(text: str) -> list[tuple[int, str]]:
    """(line, name) of each ``lit_distill.x.Y`` in backticks and each ``class_path: lit_distill...`` in yaml."""
    names = []
    for line, content in inline_code(text):
        match = re.match(r"lit_distill(?:\.[A-Za-z_]\w*)+(?::[A-Za-z_]\w*)?", content)  # or a console entry
        if match:
            names.append((line, match.group().replace(":", ".")))
    for block in code_blocks(text):
        if block.lang in ("yaml", "yml"):
            for offset, code_line in enumerate(block.code.split("\n")):
                match = re.search(r"class_path:\s*(lit_distill(?:\.[A-Za-z_]\w*)+)", code_line)
                if match:
                    names.append((block.line + offset, match.group(1)))
    return names


def import_problem(name: str) -> str | None:
    """Why ``name`` (a module, or an attribute path inside one) does not import; None when it does."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            target = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name and (module_name == error.name or module_name.startswith(error.name + ".")):
                continue  # no such module: try the attribute path one level up
            return f"importing {module_name} fails: {error!r}"
        except Exception as error:  # a module that exists but is broken
            return f"importing {module_name} fails: {error!r}"
        for attribute in parts[cut:]:
            try:
                target = getattr(target, attribute)
            except AttributeError:
                return f"{module_name} has no {'.'.join(parts[cut:])}"
            except Exception as error:  # a lazy attribute whose module is broken
                return f"{module_name}.{attribute} fails: {error!r}"
        return None
    return f"no module {parts[0]}"


def unimportable_names(text: str, page: str = "<page>") -> list[str]:
    problems = []
    for line, name in dotted_names(text):
        problem = import_problem(name)
        if problem:
            problems.append(f"{page}:{line}: `{name}`: {problem}")
    return problems


FILE_PATH = re.compile(r"(?:lit_distill|configs|tests|bench|docs)/[\w./-]*\.\w+")


def missing_files(text: str, page: str = "<page>", root: Path = ROOT) -> list[str]:
    """Each repository file path in backticks (``lit_distill/...py``, ``configs/...yaml``, ...) that is not there."""
    return [
        f"{page}:{line}: `{content}` does not exist"
        for line, content in inline_code(text)
        if FILE_PATH.fullmatch(content) and not (root / content).exists()
    ]


def yaml_problems(text: str, page: str = "<page>") -> list[str]:
    problems = []
    for block in code_blocks(text, page):
        if block.lang in ("yaml", "yml"):
            try:
                yaml.safe_load(block.code)
            except yaml.YAMLError as error:
                problems.append(f"{page}:{block.line}: the yaml block does not parse: {error}")
    return problems


RUNNER = r"""
import json, sys, traceback
namespace = {"__name__": "__main__"}
for block in json.load(sys.stdin):
    try:  # blank lines first, so that a traceback's line numbers are the page's
        exec(compile("\n" * (block["line"] - 1) + block["code"], block["page"], "exec"), namespace)
    except BaseException:
        traceback.print_exc()
        sys.stderr.write(f"\nthe runnable block at {block['page']}:{block['line']} failed\n")
        sys.exit(1)
"""


def run_blocks(blocks: list[Block], cwd: Path, timeout: float = 300) -> str | None:
    """Run ``blocks`` in order in one namespace in a fresh Python; None, or what went wrong (page and line)."""
    if not blocks:
        return None
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}
    payload = json.dumps([{"page": b.page, "line": b.line, "code": b.code} for b in blocks])
    command = [sys.executable, "-c", RUNNER]
    result = subprocess.run(command, input=payload, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)
    return None if result.returncode == 0 else result.stderr[-6000:]


def runnable_blocks(page: Path) -> list[Block]:
    return [b for b in code_blocks(page.read_text(), _name(page)) if b.runnable]


# ------------------------------------------------------------------------------------------ the docs
@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if runnable_blocks(p)], ids=_name)
def test_runnable_blocks_run(page, tmp_path):
    problem = run_blocks(runnable_blocks(page), cwd=tmp_path)
    assert problem is None, problem


def test_the_examples_the_docs_promise_are_marked_runnable():
    """Dropping a marker would silently stop a check: the README's Trainer.fit example, and the loss and the
    fused-linear examples, stay runnable."""
    readme = "\n".join(b.code for b in runnable_blocks(ROOT / "README.md"))
    losses = "\n".join(b.code for b in runnable_blocks(ROOT / "docs" / "losses.md"))
    assert "trainer.fit(" in readme
    assert "distillation_loss(" in losses and "fused_linear_distillation_loss(" in losses
    for page in PAGES:  # a marker outside code must stand right before a python fence, or it marks nothing
        lines = page.read_text().split("\n")
        in_code = {b.line + k for b in code_blocks(page.read_text()) for k in range(-1, len(b.code.split("\n")) + 1)}
        for number, line in enumerate(lines[:-1], start=1):
            if line.strip() == MARKER and number not in in_code:
                assert lines[number].lstrip().startswith("```python"), f"{_name(page)}:{number}: marks no block"


def test_yaml_blocks_parse():
    problems = [p for page in PAGES for p in yaml_problems(page.read_text(), _name(page))]
    assert not problems, "\n".join(problems)


def test_relative_links_resolve():
    problems = [p for page in LINKED_PAGES for p in broken_links(page.read_text(), page)]
    assert not problems, "\n".join(problems)


@pytest.mark.slow  # imports the whole package, the demo and the command line included
def test_lit_distill_names_in_the_docs_import():
    problems = [p for page in PAGES for p in unimportable_names(page.read_text(), _name(page))]
    assert not problems, "\n".join(problems)


def test_file_paths_in_the_docs_exist():
    problems = [p for page in PAGES for p in missing_files(page.read_text(), _name(page))]
    assert not problems, "\n".join(problems)


def test_the_readme_stays_a_front_page():
    """The README is the front page (at most about 250 lines); the depth lives in docs/."""
    assert len((ROOT / "README.md").read_text().split("\n")) <= 260


# ------------------------------------------------------------------------------------------ the checkers can fail
BROKEN_PAGE = """# A page

## Getting started

See [the loss](losses.md#the-loss), [nothing](no-such-page.md), [a bad anchor](#getting-startd),
[a good one](#getting-started) and [the web](https://example.com/x.md). Not a link: `[x](nowhere.md)`.

```python
[not a link](nowhere-either.md)
```
"""


def test_the_link_checker_reports_a_missing_file_and_a_bad_anchor(tmp_path):
    (tmp_path / "losses.md").write_text("# Losses\n\n## The loss\n")
    page = tmp_path / "page.md"
    problems = broken_links(BROKEN_PAGE, page)
    assert len(problems) == 2, problems
    assert "page.md:5: link to no-such-page.md: there is no no-such-page.md" in problems[0]
    assert "link to #getting-startd" in problems[1] and "has no heading #getting-startd" in problems[1]
    (tmp_path / "losses.md").write_text("# Losses\n\n## The losses\n")  # the heading renamed
    assert any("losses.md#the-loss" in p for p in broken_links(BROKEN_PAGE, page))


def test_slugs_follow_github():
    assert slug("On-policy distillation: a student's samples") == "on-policy-distillation-a-students-samples"
    assert slug("A moving average of the student: `StudentEMA`") == "a-moving-average-of-the-student-studentema"
    assert slug("The `lit_distill.data` package, 2.0!") == "the-lit_distilldata-package-20"
    assert anchors("# Notes\n\n## Notes\n\n```\n# not a heading\n```\n") == {"notes", "notes-1"}


def test_the_runner_names_the_page_and_line_of_a_block_calling_a_renamed_function(tmp_path):
    page = """# Example

<!-- runnable -->
```python
import lit_distill
x = 1
```

Unmarked blocks do not run:

```python
raise SystemExit("must not run")
```

<!-- runnable -->
```python
assert x == 1  # the namespace of the blocks above
lit_distill.distilation_loss  # renamed
```
"""
    blocks = [b for b in code_blocks(page, "docs/example.md") if b.runnable]
    assert [b.line for b in blocks] == [5, 17]
    problem = run_blocks(blocks, cwd=tmp_path)
    assert problem is not None
    assert "the runnable block at docs/example.md:17 failed" in problem
    assert 'File "docs/example.md", line 18' in problem and "distilation_loss" in problem


def test_the_name_checker_reports_a_renamed_class_and_a_moved_module():
    page = "`lit_distill.losses.DistillationLos`, `lit_distill.losses.DistillationLoss`,\n`lit_distill.no_such.Thing`."
    problems = unimportable_names(page, "page.md")
    assert len(problems) == 2, problems
    entry_point = unimportable_names("`lit_distill.losses:DistillationLos` (a console entry)")
    assert entry_point[0].endswith("lit_distill.losses has no DistillationLos"), entry_point
    assert problems[0].startswith("page.md:1: `lit_distill.losses.DistillationLos`: lit_distill.losses has no")
    assert problems[1].startswith("page.md:2: `lit_distill.no_such.Thing`")
    yaml_page = "```yaml\nmodel:\n  class_path: lit_distill.modules.SoftLabelDistillatio\n```\n"
    assert unimportable_names(yaml_page, "c.md") == [
        "c.md:3: `lit_distill.modules.SoftLabelDistillatio`: lit_distill.modules has no SoftLabelDistillatio"
    ]


def test_the_file_checker_and_the_yaml_checker_report_problems():
    page = "See `lit_distill/kernels/functional.py` and `configs/no_such.yaml`.\n\n```yaml\na: [1, 2\n```\n"
    assert missing_files(page, "p.md") == ["p.md:1: `configs/no_such.yaml` does not exist"]
    problems = yaml_problems(page, "p.md")
    assert len(problems) == 1 and problems[0].startswith("p.md:4: the yaml block does not parse")
