"""README's Python code runs as written: each ```python block of README.md, on its own, in a fresh
process (in a temporary folder, so the files a block writes land there).

A block that cannot run here says so where a reader sees it: its first line is a comment starting
``# not run by the tests:`` followed by the reason, and the test is skipped with that reason."""

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
NOT_RUN = "# not run by the tests:"


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number of the opening fence, code) of every ```python block, indented ones included."""
    blocks = []
    for m in re.finditer(r"^([ \t]*)```python[ \t]*\n(.*?)^\1```[ \t]*$", text, re.M | re.S):
        line = text.count("\n", 0, m.start()) + 1
        blocks.append((line, textwrap.dedent(m[2])))
    return blocks


BLOCKS = python_blocks(README.read_text())


def test_readme_has_python_blocks_and_each_is_found():
    assert len(BLOCKS) >= 3
    assert len(BLOCKS) == README.read_text().count("```python")


@pytest.mark.parametrize("line,code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_python_block_runs_on_its_own(line, code, tmp_path):
    first = code.lstrip().splitlines()[0]
    if first.startswith(NOT_RUN):
        pytest.skip(first[len(NOT_RUN):].strip())
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, f"README.md line {line}:\n{code}\n{r.stderr[-3000:]}"
