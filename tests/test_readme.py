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


DOCS = [  # the project's Markdown pages (not those of caches such as .pytest_cache)
    README,
    *README.parent.glob("docs/*.md"),
    *(p for p in README.parent.glob("*/README.md") if not p.parent.name.startswith(".")),
]


def heading_anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to
    hyphens (`code` marks and other symbols vanish, letters of any script stay)."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)  # no code
    return {heading_anchor(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


def relative_links(path: Path):
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if not re.match(r"[a-z]+:", target):  # http:, https:, mailto: are not checked
            yield target


def test_heading_anchor_follows_github():
    assert heading_anchor("Exact statistics (`vmap` backend), the baseline") == (
        "exact-statistics-vmap-backend-the-baseline"
    )
    assert heading_anchor("Training: train steps and the `fit` loop") == (
        "training-train-steps-and-the-fit-loop"
    )


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(README.parent)))
def test_relative_links_reach_a_file_and_heading(doc):
    """The README sends readers to docs/ and benchmarks/ for details: every relative link
    of the project's Markdown files names a file that exists and, after #, one of its
    headings."""
    broken = []
    for target in relative_links(doc):
        file_part, _, anchor = target.partition("#")
        linked = (doc.parent / file_part).resolve() if file_part else doc
        if not linked.exists():
            broken.append(f"{target}: no file {linked}")
        elif anchor and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    assert not broken, f"{doc.name}: " + "; ".join(broken)
