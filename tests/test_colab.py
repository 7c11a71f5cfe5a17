"""The Colab path: one setup cell in every notebook a learner opens, one repository address, and the
cell run in an environment built like Colab's (torch preinstalled, Colab's pinned kernel, Jupyter,
tornado and widget packages) without moving any of them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, from PyPI (pytest depends on it there)
    import tomli as tomllib

import nbformat
import pytest
from packaging.requirements import Requirement

from course_tools import colab_setup
from course_tools.grading import notebooks as generator

ROOT = Path(__file__).resolve().parent.parent
LEARNER_NOTEBOOKS = [p for folder in ("notebooks", "solutions", "exercises") for p in sorted((ROOT / folder).glob("*.ipynb"))]

# What Colab's runtime ships and pins for itself (late 2026, Python 3.12 there; torch is its CUDA build).
# The Colab-like test installs exactly these, on this machine's Python, before it runs the setup cell.
COLAB_PINS = {
    "torch": "2.13.0",
    "ipykernel": "6.17.1",
    "ipython": "7.34.0",
    "jupyter-client": "6.1.12",
    "notebook": "6.5.7",
    "tornado": "6.4.2",
    "ipywidgets": "7.7.1",
    "widgetsnbextension": "3.6.10",
}
# Also on Colab before anything is installed (the setup cell must not need to move them either).
COLAB_ALSO_HAS = ["numpy==2.4.6", "matplotlib==3.11.2", "scikit-image==0.26.0", "tqdm==4.70.1",
                  "safetensors==0.8.0", "transformers==5.24.0"]


def test_every_learner_notebook_starts_with_the_same_setup_cell():
    expected = colab_setup.setup_cell()
    assert len(LEARNER_NOTEBOOKS) >= 27
    wrong = []
    for path in LEARNER_NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        if not code or code[0].source != expected:
            wrong.append(str(path.relative_to(ROOT)))
        elif any(c.cell_type == "code" for c in nb.cells[: nb.cells.index(code[0])]):
            wrong.append(str(path.relative_to(ROOT)))
    assert not wrong, f"run `python3 course.py colab` then `python3 course.py exercises`; out of date: {wrong}"
    assert colab_setup.sync(write=False) == []


def test_the_repository_is_named_in_one_place():
    repo = colab_setup.repository_url()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["urls"]["Repository"] == repo
    readme = (ROOT / "README.md").read_text()
    badges = re.findall(r"https://colab\.research\.google\.com/github/([^/\s)]+/[^/\s)]+)/blob/main/(\S+?\.ipynb)", readme)
    assert len(badges) >= 9 and {b for b, _ in badges} == {colab_setup.github_path(repo)}
    for _, notebook in badges:
        assert (ROOT / notebook).exists(), notebook
    assert "course.py colab" in readme and "[project.urls]" in readme  # how a fork sets its address
    # the address appears nowhere else in the course's own files
    for path in [ROOT / "course.py", *ROOT.glob("course_lib/**/*.py"), *ROOT.glob("course_tools/**/*.py"), *ROOT.glob("docs/*.md")]:
        assert repo not in path.read_text(), f"{path} names the repository; read it from pyproject.toml instead"


def test_a_fork_changes_one_line_and_sync_writes_it_everywhere(tmp_path):
    for folder in ("notebooks", "solutions"):
        (tmp_path / folder).mkdir()
    (tmp_path / "pyproject.toml").write_text('[project]\nurls = { Repository = "https://github.com/someone/fork" }\n')
    (tmp_path / "README.md").write_text(
        "[![Open In Colab](b.svg)](https://colab.research.google.com/github/latent-diffusion-course/course/blob/main/notebooks/a.ipynb)\n")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# t"), nbformat.v4.new_code_cell("x = 1")])
    nbformat.write(nb, tmp_path / "solutions" / "a.ipynb")
    lesson = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("# Colab setup: old\nimport os"), nbformat.v4.new_code_cell("y = 2")])
    lesson.cells[0].id = "l99-01"
    nbformat.write(lesson, tmp_path / "notebooks" / "a.ipynb")
    changed = colab_setup.sync(tmp_path)
    assert {p.name for p in changed} == {"a.ipynb", "README.md"} and len(changed) == 3
    assert "github/someone/fork/blob/main/notebooks/a.ipynb" in (tmp_path / "README.md").read_text()
    sol = nbformat.read(tmp_path / "solutions" / "a.ipynb", as_version=4)
    assert [c.source.splitlines()[0][:14] for c in sol.cells] == ["# t", "# Colab setup:", "x = 1"]
    assert 'COURSE_REPO = "https://github.com/someone/fork"' in sol.cells[1].source and sol.cells[1].id == "colab-setup"
    les = nbformat.read(tmp_path / "notebooks" / "a.ipynb", as_version=4)
    assert les.cells[0].id == "l99-01" and les.cells[0].source == colab_setup.setup_cell("https://github.com/someone/fork")
    assert colab_setup.sync(tmp_path) == []  # idempotent
    with pytest.raises(ValueError, match="github.com/OWNER/NAME"):
        colab_setup.github_path("https://gitlab.com/someone/fork")


def test_the_student_version_keeps_the_setup_cell_and_the_grader_skips_it():
    for path in sorted((ROOT / "solutions").glob("*.ipynb")):
        student = generator.student_version(nbformat.read(path, as_version=4), path.name)
        first = next(c for c in student.cells if c.cell_type == "code")
        assert colab_setup.is_setup_cell(first.source) and first.outputs == []
    forked = colab_setup.setup_cell("https://github.com/someone/fork")
    assert colab_setup.is_setup_cell(forked)
    assert not colab_setup.is_setup_cell(forked + "\nimport shutil")
    executor = (ROOT / "course_tools" / "grading" / "executor.py").read_text()
    assert "is_setup_cell" in executor


def test_outside_colab_the_cell_does_nothing(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != colab_setup.TEST_DIR_ENV}
    code = colab_setup.setup_cell() + "\nprint(ON_COLAB, os.getcwd())"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", str(tmp_path)] and list(tmp_path.iterdir()) == []


def test_the_library_does_not_move_what_colab_pins():
    """pip install of the library alone (what the setup cell does) accepts Colab's versions as they are."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for line in project["dependencies"]:
        req = Requirement(line)
        name = req.name.lower().replace("_", "-")
        assert name not in {"jupyterlab", "jupyter-client", "tornado", "notebook", "nbclient", "jupyter-server"}, line
        if name in COLAB_PINS:
            assert req.specifier.contains(COLAB_PINS[name], prereleases=True), f"{line} rejects Colab's {COLAB_PINS[name]}"
        if name in ("ipykernel", "ipython", "traitlets", "pyzmq"):
            pytest.fail(f"{line}: the library must not ask for the kernel's packages; they belong in the lab extra")


def test_install_pins_every_package_colab_keeps(monkeypatch, tmp_path):
    """The pip command the setup cell runs: the course, editable, under constraints = the kept versions."""
    seen = {}

    def fake_pip(cmd):
        seen["cmd"], seen["pins"] = cmd, Path(cmd[cmd.index("-c") + 1]).read_text()
        return 0

    monkeypatch.setattr(colab_setup.subprocess, "call", fake_pip)
    monkeypatch.setattr(colab_setup, "installed_from", lambda course_dir: False)
    kept = colab_setup.install(tmp_path)
    assert {"torch", "numpy", "ipykernel", "ipywidgets", "tornado", "jupyter-client"} <= set(kept)
    assert seen["pins"].splitlines() == [f"{n}=={v}" for n, v in kept.items()]
    assert seen["cmd"][1:4] == ["-m", "pip", "install"] and seen["cmd"][-2:] == ["-e", str(tmp_path)]
    monkeypatch.setattr(colab_setup.subprocess, "call", lambda cmd: 1)
    with pytest.raises(RuntimeError, match="Disconnect and delete runtime"):
        colab_setup.install(tmp_path)
    assert not colab_setup.installed_from(tmp_path)
