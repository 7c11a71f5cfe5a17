"""solutions/ is the one source; exercises/ is generated from it and must be up to date; under nbval
every solution notebook passes and every exercise notebook fails at its check cells, with feedback."""

from __future__ import annotations

import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import nbformat
import pytest

from course_tools.grading import notebooks

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))


def test_exercises_are_up_to_date():
    report = notebooks.generate(write=False)
    assert not report.stale and not report.missing and not report.orphans, (
        "exercises/ is out of date: run `python course.py exercises`", report)
    assert len(SOLUTIONS) == 12


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.stem)
def test_the_student_version_hides_the_answers_and_keeps_the_checks(path):
    sol = nbformat.read(path, as_version=4)
    ex = nbformat.read(ROOT / "exercises" / path.name, as_version=4)
    assert [c.id for c in sol.cells] == [c.id for c in ex.cells]  # stable ids: the grader relies on them
    for s, e in zip(sol.cells, ex.cells):
        assert "### BEGIN SOLUTION" not in e.source and "### END SOLUTION" not in e.source
        if e.cell_type == "code":
            assert e.outputs == [] and e.execution_count is None
        if notebooks.is_checker(s):
            assert e.source == s.source
            assert e.metadata == {k: v for k, v in s.metadata.items() if k != "execution"}
        if "solution" in s.metadata.get("tags", []):
            assert e.source == notebooks.ANSWER_PLACEHOLDER
        if "### BEGIN SOLUTION" in s.source:
            assert "raise NotImplementedError(" in e.source
    assert any(c.cell_type == "code" and c.outputs for c in sol.cells), "commit solutions executed"
    assert ex.metadata["course"]["source"] == f"solutions/{path.name}"


def test_regions_are_replaced_by_stubs_with_hints_and_bad_regions_are_refused():
    src = ("class A:\n    def f(self, x):\n        ### BEGIN SOLUTION\n        ### HINT: use x twice\n"
           "        return x + x\n        ### END SOLUTION\n")
    out = notebooks.strip_solutions(src)
    assert "return x + x" not in out and "# Hint: use x twice" in out
    assert 'raise NotImplementedError("A.f: write your code here' in out
    compile(out, "stub", "exec")
    for bad in ("### BEGIN SOLUTION\nx = 1\n", "x = 1\n### END SOLUTION\n",
                "### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION\n"):
        with pytest.raises(notebooks.SourceError):
            notebooks.strip_solutions(bad)


def test_check_sync_fails_on_a_stale_copy_and_generate_fixes_it(tmp_path):
    sol, ex = tmp_path / "solutions", tmp_path / "exercises"
    shutil.copytree(ROOT / "solutions", sol)
    shutil.copytree(ROOT / "exercises", ex)
    assert not notebooks.generate(sol, ex, write=False).stale
    nb = nbformat.read(sol / "03_clip_exercises.ipynb", as_version=4)
    nb.cells[0].source += "\n\nA new sentence."
    nbformat.write(nb, sol / "03_clip_exercises.ipynb")
    (ex / "99_orphan.ipynb").write_text("{}")
    cmd = [sys.executable, "-m", "course_tools.grading", "check-sync", "--solutions", str(sol), "--exercises", str(ex)]
    stale = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert stale.returncode == 1 and "out of date: " in stale.stdout and "03_clip_exercises" in stale.stdout
    assert "99_orphan" in stale.stdout
    (ex / "99_orphan.ipynb").unlink()
    written = notebooks.generate(sol, ex, write=True)
    assert [p.name for p in written.written] == ["03_clip_exercises.ipynb"]
    assert written.backups == []  # nobody had touched that copy: nothing to keep
    report = notebooks.generate(sol, ex, write=False)
    assert not report.stale and not report.missing and not report.orphans


def test_generate_keeps_a_copy_of_a_learners_answers(tmp_path):
    """Regenerating exercises/ (after a course update, say) never loses work done in it."""
    sol, ex = tmp_path / "solutions", tmp_path / "exercises"
    shutil.copytree(ROOT / "solutions", sol)
    shutil.copytree(ROOT / "exercises", ex)
    name = "01_vae_exercises.ipynb"
    mine = nbformat.read(ex / name, as_version=4)
    code = next(c for c in mine.cells if c.cell_type == "code" and "write your code here" in c.source)
    code.source = code.source.replace("raise NotImplementedError", "return 42  # my answer", 1)
    assert "my answer" in code.source
    nbformat.write(mine, ex / name)
    assert notebooks.holds_learner_work(ex / name)
    assert not notebooks.holds_learner_work(ex / "02_cross_attention_exercises.ipynb")

    cmd = [sys.executable, "-m", "course_tools.grading", "generate", "--solutions", str(sol), "--exercises", str(ex)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    backups = sorted((ex / notebooks.BACKUPS).glob("*.ipynb"))
    assert [b.name.startswith("01_vae_exercises-") for b in backups] == [True]
    assert "kept your edited copy as" in out.stdout and backups[0].name in out.stdout
    assert "my answer" in backups[0].read_text()  # the learner's work, whole
    assert "my answer" not in (ex / name).read_text()  # the fresh student version
    again = notebooks.generate(sol, ex, write=True)
    assert again.written == [] and again.backups == [] and not again.orphans  # backups/ is not an exercise


@pytest.mark.slow
def test_nbval_solutions_pass_and_exercises_fail_with_feedback(tmp_path):
    """One pytest --nbval-lax run over both folders, two workers; then every item is inspected."""
    xml = tmp_path / "nbval.xml"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-o", "addopts=", "-p", "no:cacheprovider", "--nbval-lax",
         "--nbval-current-env", "-n", "2", "--dist", "loadscope", f"--junitxml={xml}", "-q",
         "solutions", "exercises"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert xml.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    items: dict[str, list] = {}
    seconds: dict[str, float] = {}
    for case in ET.parse(xml).iter("testcase"):
        key = "/".join(case.get("classname").split(".", 1))
        seconds[key] = seconds.get(key, 0.0) + float(case.get("time") or 0)
        failure = case.find("failure")
        if failure is None:
            failure = case.find("error")
        folder, nb = case.get("classname").split(".", 1)
        items.setdefault(f"{folder}/{nb}", []).append((case.get("name"), failure))
    report = ROOT / "artifacts" / "solution_times.md"  # the run time of each notebook in this run
    report.parent.mkdir(exist_ok=True)
    report.write_text("| notebook | seconds |\n| --- | ---: |\n"
                      + "".join(f"| {k} | {v:.1f} |\n" for k, v in sorted(seconds.items())))
    for path in SOLUTIONS:
        got = items[f"solutions/{path.name}"]
        failed = [(name, f.text[-800:]) for name, f in got if f is not None]
        assert got and not failed, (path.name, failed)
    for path in SOLUTIONS:
        nb = nbformat.read(ROOT / "exercises" / path.name, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]  # nbval numbers code cells only
        got = dict(items[f"exercises/{path.name}"])
        for i, cell in enumerate(code):
            failure = got[f"Cell {i}"]
            if notebooks.is_checker(cell):
                assert failure is not None, (path.name, cell.id, "a check cell passed on the stubs")
                text = failure.text
                assert "ExerciseIncomplete" in text and "FAIL" in text and "expected:" in text and "hint:" in text
                assert "Traceback (most recent call last)" not in text, "feedback, not a traceback"
            elif failure is not None:  # only the stubs may fail elsewhere
                assert "NotImplementedError" in failure.text, (path.name, cell.id, failure.text[-500:])
