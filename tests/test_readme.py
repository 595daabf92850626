"""Every Python example in README.md runs, top to bottom, as a reader would paste them.

Blocks fenced as ```python run in one namespace in document order (later examples may
use names an earlier one defined); signatures and shell commands are fenced otherwise.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    text = README.read_text()
    for match in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
        yield text[: match.start()].count("\n") + 1, match.group(1)


def test_readme_has_python_examples():
    assert len(list(python_blocks())) >= 10


@pytest.mark.slow
def test_every_readme_python_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples write plots into the working directory
    namespace: dict = {}
    for line, code in python_blocks():
        try:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
        except Exception as error:  # name the block, not just the exception
            raise AssertionError(f"the README example at line {line} fails: {error!r}") from error
    assert (tmp_path / "spectrum.png").exists()
