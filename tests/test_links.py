"""Every relative link in the lessons, the exercise notebooks and the docs points at a file that exists."""

import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _documents():
    for folder in ("notebooks", "solutions", "exercises"):
        yield from sorted((ROOT / folder).glob("*.ipynb"))
    yield ROOT / "README.md"
    yield from sorted((ROOT / "docs").glob("*.md"))


def _markdown(path: Path) -> str:
    if path.suffix == ".ipynb":
        nb = nbformat.read(path, as_version=4)
        return "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    return path.read_text()


@pytest.mark.parametrize("path", list(_documents()), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    broken = []
    for target in LINK.findall(_markdown(path)):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # web links and in-page anchors
        file_part = target.split("#", 1)[0]
        if file_part and not (path.parent / file_part).exists():
            broken.append(target)
    assert not broken, f"{path.relative_to(ROOT)} links to missing files: {broken}"
