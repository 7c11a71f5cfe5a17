"""The Colab setup cell: one text, the first code cell of every notebook a learner opens.

Colab runs each notebook in a fresh runtime that has torch (a CUDA build) and its own pinned kernel,
Jupyter and widget packages, and nothing of the course. The cell (``SETUP_CELL``) therefore, on Colab
only, clones the course into ``/content/course`` and calls ``install`` below, which installs the
course's library with ``pip -c`` constraints that hold every package Colab relies on at the version it
has: pip adds what Colab lacks (diffusers, the CLIP tokenizer, ...) and moves nothing else. Upgrading
ipykernel, jupyter-client, tornado or ipywidgets in a running Colab session is a known way to break it
after the next restart, and Colab's own widget manager renders ipywidgets 7 (Colab ships 7.7.1); with
ipywidgets 8 the sliders only render through Colab's custom widget manager, which ``install`` then
enables. Everywhere else (JupyterLab, nbval, the grader) the cell does nothing.

The repository's address is written in one place, ``[project.urls] Repository`` in pyproject.toml;
``python3 course.py colab`` writes it into every notebook's setup cell and the README's Colab badges,
and ``tests/test_colab.py`` checks that all of them agree (forks: README, section "Colab").

This module is imported on Colab straight from the fresh clone, before anything is installed: the
Colab side uses the standard library only.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_FOLDERS = ("notebooks", "solutions")  # exercises/ is generated from solutions/ (course.py exercises)
SETUP_CELL_ID = "colab-setup"  # the id given to a setup cell inserted into a notebook that had none
TEST_DIR_ENV = "COURSE_COLAB_TEST_DIR"  # set only by tests/test_colab.py: act as Colab, with this folder as /content

SETUP_CELL = '''\
# Colab setup: on Colab, fetch the course and install only what Colab lacks; elsewhere this cell does nothing.
import os, sys
COURSE_REPO = "{repo}"  # forks: see the README, section "Colab"
try:
    import google.colab  # only Colab has it
    ON_COLAB = True
except ImportError:
    ON_COLAB = "{test_env}" in os.environ  # the course's Colab-like test; never set it by hand
if ON_COLAB:
    import subprocess
    COURSE_DIR = os.path.join(os.environ.get("{test_env}", "/content"), "course")
    if not os.path.isdir(COURSE_DIR):
        subprocess.run(["git", "clone", "--quiet", "--depth", "1", COURSE_REPO, COURSE_DIR], check=True)
    sys.path.insert(0, COURSE_DIR)
    from course_tools.colab_setup import install
    install(COURSE_DIR)  # keeps Colab's torch, kernel, Jupyter and widget packages as they are
    os.chdir(os.path.join(COURSE_DIR, "notebooks"))'''

# What Colab's runtime relies on and pins for itself: never upgraded or downgraded by the setup cell.
# (Colab's own warning after a pip install names ipython, ipykernel, tornado, prompt-toolkit and pyzmq.)
COLAB_KEEPS = (
    "torch", "torchvision", "torchaudio", "numpy",
    "ipython", "ipykernel", "jupyter-client", "jupyter-core", "jupyter-server", "notebook", "tornado",
    "traitlets", "pyzmq", "prompt-toolkit", "ipywidgets", "widgetsnbextension", "jupyterlab-widgets",
)


# ----------------------------------------------------------------------------------------------
# On Colab (standard library only)
# ----------------------------------------------------------------------------------------------
def installed_versions(names=COLAB_KEEPS) -> dict[str, str]:
    """The installed version of each of ``names`` that is installed."""
    from importlib import metadata

    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def installed_from(course_dir: str | os.PathLike) -> bool:
    """True when the course's library is already installed (editable) from ``course_dir``."""
    import json
    from importlib import metadata

    try:
        dist = metadata.distribution("latent-diffusion-course")
    except metadata.PackageNotFoundError:
        return False
    url = json.loads(dist.read_text("direct_url.json") or "{}").get("url", "")
    return url.rstrip("/") == Path(course_dir).resolve().as_uri()


def install(course_dir: str | os.PathLike, quiet: bool = True) -> dict[str, str]:
    """Install the course's library from ``course_dir`` without moving any package of ``COLAB_KEEPS``.

    Every package of ``COLAB_KEEPS`` that is installed is pinned to its version with a pip constraints
    file, so pip can only add packages. Returns the pins. Raises RuntimeError, saying what to do, if pip
    fails or (which the constraints rule out) a kept package changed anyway. A second run in the same
    runtime (the cell run again) finds the course installed and only checks the widgets.
    """
    kept = installed_versions()
    if installed_from(course_dir):
        enable_widgets()
        return kept
    with tempfile.NamedTemporaryFile("w", suffix="-colab-keeps.txt", delete=False) as f:
        f.write("".join(f"{name}=={version}\n" for name, version in kept.items()))
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-c", f.name, "-e", str(course_dir)]
    if quiet:
        cmd.insert(4, "-q")
    try:
        code = subprocess.call(cmd)
    finally:
        os.unlink(f.name)
    if code != 0:
        raise RuntimeError(
            f"pip could not install the course without changing a package that Colab pins ({code=}). "
            "Use Runtime > Disconnect and delete runtime, then run this cell again; if it fails again, "
            "please report it with the output above.")
    moved = {n: (v, now) for n, v in kept.items() if (now := installed_versions([n]).get(n)) != v}
    if moved:
        raise RuntimeError(f"packages Colab relies on changed: {moved}; use Runtime > Disconnect and delete runtime")
    importlib.invalidate_caches()  # packages installed just now become importable in this kernel
    widgets = " (Colab's custom widget manager on, for ipywidgets 8)" if enable_widgets() else ""
    print(f"The course is installed; {len(kept)} packages Colab relies on kept as they were{widgets}.")
    return kept


def enable_widgets() -> bool:
    """Make the course's sliders render on Colab. Returns True when the custom widget manager was enabled.

    Colab's built-in widget manager renders ipywidgets 7 (Colab's 7.7.1); ipywidgets 8 needs
    ``google.colab.output.enable_custom_widget_manager()``. Outside Colab this does nothing.
    """
    try:
        import ipywidgets
        from google.colab import output
    except ImportError:
        return False
    if int(ipywidgets.__version__.split(".")[0]) < 8:
        return False
    output.enable_custom_widget_manager()
    return True


# ----------------------------------------------------------------------------------------------
# In the repository: one address, written everywhere it is needed
# ----------------------------------------------------------------------------------------------
def repository_url(root: Path = ROOT) -> str:
    """``[project.urls] Repository`` of pyproject.toml: the one place that names the course's repository."""
    text = (root / "pyproject.toml").read_text()
    m = re.search(r'^urls\s*=\s*\{\s*Repository\s*=\s*"([^"]+)"', text, re.MULTILINE)
    if not m:
        raise ValueError('pyproject.toml needs, in [project], the line  '
                         'urls = { Repository = "https://github.com/OWNER/NAME" }')
    return m.group(1).rstrip("/")


def setup_cell(repo: str | None = None) -> str:
    """The setup cell's source for the repository ``repo`` (default: pyproject.toml's)."""
    return SETUP_CELL.format(repo=repo or repository_url(), test_env=TEST_DIR_ENV)


def is_setup_cell(source: str) -> bool:
    """True for the course's setup cell, whatever repository it names (the grader skips it)."""
    any_repo = re.sub(r'^COURSE_REPO = "[^"]*"', 'COURSE_REPO = "\0"', source.strip(), flags=re.MULTILINE)
    return any_repo == setup_cell("\0")


def github_path(repo: str) -> str:
    """"OWNER/NAME" of a GitHub address, for Colab's badges (colab.research.google.com/github/OWNER/NAME/...)."""
    m = re.fullmatch(r"https://github\.com/([^/\s]+/[^/\s]+?)(?:\.git)?", repo)
    if not m:
        raise ValueError(f"{repo!r}: Colab opens notebooks from GitHub; "
                         "give an address like https://github.com/OWNER/NAME")
    return m.group(1)


BADGE = re.compile(r"https://colab\.research\.google\.com/github/[^/\s)]+/[^/\s)]+/blob/")


def first_code_cell(nb):
    return next((i for i, c in enumerate(nb.cells) if c.cell_type == "code"), None)


def put_setup_cell(nb, cell_source: str) -> bool:
    """Make ``cell_source`` the first code cell of ``nb`` (in place). Returns True if ``nb`` changed."""
    import nbformat

    i = first_code_cell(nb)
    if i is not None and nb.cells[i].source.startswith("# Colab setup"):
        if nb.cells[i].source == cell_source:
            return False
        nb.cells[i].source = cell_source
        nb.cells[i].outputs = []  # outside Colab the cell prints nothing
        return True
    cell = nbformat.v4.new_code_cell(cell_source)
    cell.id = SETUP_CELL_ID
    nb.cells.insert(len(nb.cells) if i is None else i, cell)
    return True


def sync(root: Path = ROOT, write: bool = True) -> list[Path]:
    """Put the setup cell first among the code cells of every lesson and solution notebook, and the
    repository into the README's badges. Returns the files that changed (or would, with write=False).

    A notebook whose first code cell is an older setup cell (it starts with "# Colab setup") gets it
    replaced in place (its id kept); any other notebook gets a new cell before its first code cell.
    Run ``course.py exercises`` afterwards: the student notebooks take the cell from solutions/.
    """
    import nbformat

    repo = repository_url(root)
    cell_source = setup_cell(repo)
    changed = []
    for folder in NOTEBOOK_FOLDERS:
        for path in sorted((root / folder).glob("*.ipynb")):
            nb = nbformat.read(path, as_version=4)
            if put_setup_cell(nb, cell_source):
                changed.append(path)
                if write:
                    nbformat.write(nb, path)
    readme = root / "README.md"
    text = readme.read_text()
    new = BADGE.sub(f"https://colab.research.google.com/github/{github_path(repo)}/blob/", text)
    if new != text:
        changed.append(readme)
        if write:
            readme.write_text(new)
    return changed


def main(argv: list | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="course.py colab", description=sync.__doc__)
    parser.add_argument("--check", action="store_true", help="only report files that are out of date (exit 1 if any)")
    args = parser.parse_args(argv)
    changed = sync(write=not args.check)
    for path in changed:
        print(("out of date: " if args.check else "wrote ") + str(path.relative_to(ROOT)))
    if not args.check and any(p.parent.name == "solutions" for p in changed):
        print("now run: python3 course.py exercises   (the student notebooks take the setup cell from solutions/)")
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
