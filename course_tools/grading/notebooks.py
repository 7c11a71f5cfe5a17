"""One source for solutions and exercises: solution regions, the student version, and check cells
restored by cell id.

A solution notebook in ``solutions/`` marks what the learner writes:

- in code, a region between ``### BEGIN SOLUTION`` and ``### END SOLUTION`` lines. In the student
  version the region becomes ``raise NotImplementedError("<function>: ...")`` at the same
  indentation, preceded by any ``### HINT ...`` lines of the region as ``# Hint: ...`` comments;
- a markdown cell tagged ``solution`` (an answer to a question) becomes "*Write your answer here.*".

Check cells are tagged ``checker`` and name their exercise in ``metadata.course.exercise``; their
cell ids are stable, which is how the grader finds them in a submission and puts back its own copy.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

# The course's folder. The grader's workers run from a private copy of course_lib and are told
# where the course is by COURSE_ROOT.
ROOT = Path(os.environ.get("COURSE_ROOT") or Path(__file__).resolve().parents[2]).resolve()
SOLUTIONS = ROOT / "solutions"
EXERCISES = ROOT / "exercises"

BEGIN = re.compile(r"^(?P<indent>[ \t]*)### BEGIN SOLUTION\s*$")
END = re.compile(r"^[ \t]*### END SOLUTION\s*$")
HINT = re.compile(r"^[ \t]*### HINT:?\s?(?P<text>.*)$")
DEF = re.compile(r"^[ \t]*(?:async\s+)?def\s+(?P<name>\w+)")
CLASS = re.compile(r"^[ \t]*class\s+(?P<name>\w+)")
ANSWER_PLACEHOLDER = "*Write your answer here.*"
CHECKER_TAG = "checker"
SOLUTION_TAG = "solution"


class SourceError(ValueError):
    """A solution notebook is malformed (an unclosed region, a check cell without an exercise)."""


# ----------------------------------------------------------------------------------------------
# The student version
# ----------------------------------------------------------------------------------------------
def strip_solutions(source: str, where: str = "") -> str:
    """Replace every solution region of a code cell by a stub that raises NotImplementedError."""
    lines = source.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = BEGIN.match(lines[i])
        if not m:
            if END.match(lines[i]):
                raise SourceError(f"{where}: '### END SOLUTION' without a BEGIN (line {i + 1})")
            out.append(lines[i])
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not END.match(lines[j]):
            if BEGIN.match(lines[j]):
                raise SourceError(f"{where}: nested '### BEGIN SOLUTION' (line {j + 1})")
            j += 1
        if j == len(lines):
            raise SourceError(f"{where}: '### BEGIN SOLUTION' at line {i + 1} is never closed")
        indent = m.group("indent")
        hints = [h.group("text") for h in map(HINT.match, lines[i + 1:j]) if h]
        out += [f"{indent}# Hint: {h}" for h in hints]
        out.append(f'{indent}raise NotImplementedError("{_stub_message(lines[:i])}")')
        i = j + 1
    return "\n".join(out)


def _stub_message(before: list[str]) -> str:
    """Name the function (and class) a stub sits in: "ScheduleComparator.linear_schedule: ..."."""
    func = cls = None
    for k in range(len(before) - 1, -1, -1):
        if m := DEF.match(before[k]):
            func, indent = m.group("name"), len(before[k]) - len(before[k].lstrip())
            for line in reversed(before[:k]):
                if indent and (c := CLASS.match(line)) and len(line) - len(line.lstrip()) < indent:
                    cls = c.group("name")
                    break
            break
    name = ".".join(n for n in (cls, func) if n) or "this part"
    return f"{name}: write your code here, then run the check cell below"


def student_version(nb: nbformat.NotebookNode, source_name: str) -> nbformat.NotebookNode:
    """The exercises/ notebook made from a solutions/ notebook: stubs, no answers, no outputs."""
    out = copy.deepcopy(nb)
    course = dict(out.metadata.get("course", {}))
    course.update({"role": "exercises", "source": f"solutions/{source_name}"})
    out.metadata["course"] = course
    for cell in out.cells:
        where = f"{source_name}, cell {cell.get('id')}"
        cell.metadata.pop("execution", None)
        tags = cell.metadata.get("tags", [])
        if cell.cell_type == "markdown" and SOLUTION_TAG in tags:
            cell.source = ANSWER_PLACEHOLDER
        elif cell.cell_type == "code":
            cell.source = strip_solutions(cell.source, where)
            cell.outputs = []
            cell.execution_count = None
    out.metadata["course"]["cells_sha256"] = cells_digest(out)
    return out


def cells_digest(nb: nbformat.NotebookNode) -> str:
    """A fingerprint of what a learner can change: every cell's type, source and outputs.

    ``student_version`` stores it in the notebook's metadata; a file whose cells no longer match
    its stored fingerprint holds someone's work, and ``generate`` backs it up before replacing it."""
    cells = [[c.cell_type, c.source, c.get("outputs", [])] for c in nb.cells]
    return hashlib.sha256(json.dumps(cells, sort_keys=True, default=str).encode()).hexdigest()


def holds_learner_work(path: Path) -> bool:
    """True when the notebook at ``path`` was edited or run since it was generated (or cannot be read)."""
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception:  # unreadable: keep a copy rather than guess
        return True
    recorded = nb.metadata.get("course", {}).get("cells_sha256")
    return recorded != cells_digest(nb)


def render(nb: nbformat.NotebookNode) -> str:
    return nbformat.writes(nb) + "\n"


BACKUPS = "backups"  # exercises/backups/: edited notebooks are copied here before generate replaces them


@dataclass
class SyncReport:
    written: list[Path]
    stale: list[Path]  # exercises/ files that differ from what generate would write
    missing: list[Path]
    orphans: list[Path]  # exercises/ notebooks without a solution notebook
    backups: list[Path] = field(default_factory=list)  # copies of edited exercises/ files made before replacing them


def generate(solutions: Path = SOLUTIONS, exercises: Path = EXERCISES, write: bool = True) -> SyncReport:
    """Write (or, with write=False, only compare) the student version of every solution notebook."""
    report = SyncReport([], [], [], [])
    exercises.mkdir(parents=True, exist_ok=True) if write else None
    sources = sorted(solutions.glob("*.ipynb"))
    for src in sources:
        nb = nbformat.read(src, as_version=4)
        validate_source(nb, src.name)
        text = render(student_version(nb, src.name))
        dst = exercises / src.name
        if not dst.exists():
            report.missing.append(dst)
        elif dst.read_text() != text:
            report.stale.append(dst)
        else:
            continue
        if write:
            if dst.exists() and holds_learner_work(dst):  # never lose a learner's answers
                (exercises / BACKUPS).mkdir(exist_ok=True)
                backup = exercises / BACKUPS / f"{dst.stem}-{time.strftime('%Y%m%d-%H%M%S')}{dst.suffix}"
                shutil.copy2(dst, backup)
                report.backups.append(backup)
            dst.write_text(text)
            report.written.append(dst)
    names = {s.name for s in sources}
    report.orphans = [p for p in sorted(exercises.glob("*.ipynb")) if p.name not in names]
    return report


def validate_source(nb: nbformat.NotebookNode, name: str) -> None:
    """Ids are unique, regions are well formed, every check cell names its exercise.

    (That each named exercise exists in course_lib.checks is tested by tests/test_checkers.py;
    generation itself stays free of torch, so that it is instant.)"""
    ids = [c.get("id") for c in nb.cells]
    if None in ids or len(set(ids)) != len(ids):
        raise SourceError(f"{name}: every cell needs a unique id (nbformat 4.5)")
    for cell in nb.cells:
        if cell.cell_type == "code":
            strip_solutions(cell.source, f"{name}, cell {cell.id}")
        if CHECKER_TAG in cell.metadata.get("tags", []) and not exercise_of(cell):
            raise SourceError(f"{name}, cell {cell.id}: a check cell needs metadata.course.exercise")


# ----------------------------------------------------------------------------------------------
# Submissions: find the source, put back the check cells
# ----------------------------------------------------------------------------------------------
def parse_submission(text: str | bytes) -> nbformat.NotebookNode:
    """A submitted notebook as written: unlike ``nbformat.reads``, no validation that renames
    duplicate cell ids (it renames the later cell, which would hide a real check cell behind a copy
    placed above it). Raises ValueError when it is not a notebook the grader can run."""
    nb = nbformat.reader.reads(text)
    if nb.get("nbformat") != 4:
        nb = nbformat.convert(nb, 4)
    cells = nb.get("cells")
    if not isinstance(cells, list):
        raise ValueError("no cells")
    for cell in cells:
        if not (isinstance(cell, dict) and isinstance(cell.get("source"), str)
                and isinstance(cell.get("metadata"), dict) and cell.get("cell_type") in ("code", "markdown", "raw")):
            raise ValueError("a cell without a type, a source or metadata")
        if cell.get("id") is not None and not isinstance(cell.get("id"), str):
            raise ValueError("a cell id that is not a string")
    if not isinstance(nb.get("metadata"), dict):
        raise ValueError("no metadata")
    return nb


def source_for(submission: Path, nb: nbformat.NotebookNode | None, solutions: Path = SOLUTIONS) -> Path | None:
    """The solutions/ notebook a submission was made from: named in its file name
    (``alice_00_recap_exercises.ipynb`` works too), or else in its metadata (``course.source``).
    The file name wins: it is what the instructor asked for (`source_mismatch` flags a notebook
    that says it is another one)."""
    stems = {p.stem: p for p in solutions.glob("*.ipynb")}
    matches = [s for s in stems if s in submission.stem]
    if matches:
        return stems[max(matches, key=len)]
    if nb is not None:
        named = Path(str(nb.metadata.get("course", {}).get("source", ""))).stem
        if named in stems:
            return stems[named]
    return None


def source_mismatch(submission: Path, nb: nbformat.NotebookNode, source: Path) -> list[dict]:
    """A flag when the submission is another exercise notebook than the one it is graded as: its
    metadata names another notebook, or its check cells belong to other exercises."""
    named = Path(str(nb.metadata.get("course", {}).get("source", "") or "")).stem
    src = nbformat.read(source, as_version=4)
    own = {exercise_of(c) for c in src.cells if is_checker(c)}
    theirs = {exercise_of(c) for c in nb.cells if is_checker(c) and exercise_of(c)} - own
    if (named and named != source.stem) or theirs:
        what = f"its metadata names {named}" if named and named != source.stem else (
            f"its check cells are for {', '.join(sorted(map(str, theirs)))}")
        return [{"kind": "wrong_notebook", "cell_id": None,
                 "detail": f"graded as {source.stem} (its file name), but {what}"[:300]}]
    return []


def is_checker(cell: nbformat.NotebookNode) -> bool:
    return CHECKER_TAG in cell.metadata.get("tags", [])


def exercise_of(cell: nbformat.NotebookNode) -> str | None:
    return cell.metadata.get("course", {}).get("exercise")


@dataclass
class Restored:
    notebook: nbformat.NotebookNode
    integrity: list[dict]  # what was changed in the submission's check cells
    extra_checkers: set[str]  # ids of cells that look like check cells but are not the source's


def restore_checker_cells(submission: nbformat.NotebookNode, source: nbformat.NotebookNode) -> Restored:
    """Put the source's check cells back into a copy of the submission, by cell id.

    An edited check cell is replaced (and reported); a deleted one is inserted again after the cell
    that preceded it in the source (and reported). A copy of a check cell with another id, or a cell
    tagged ``checker`` that the source does not have, is kept but never run by the grader.
    """
    nb = copy.deepcopy(submission)
    src_cells = source.cells
    checkers = {c.id: c for c in src_cells if is_checker(c)}
    integrity: list[dict] = []
    extra: set[str] = set()
    seen: set[str] = set()
    checker_sources = {_norm(c.source) for c in checkers.values()}
    # Several cells with a check cell's id (a copy pasted above the real one): the check runs at the
    # last of them, where the learner's code above it is complete; the earlier ones are dropped.
    last = {c.get("id"): i for i, c in enumerate(nb.cells) if c.get("id") in checkers}
    kept = []
    for i, cell in enumerate(nb.cells):
        cid = cell.get("id")
        if cid in checkers and i != last[cid]:
            integrity.append({"kind": "checker_cell_duplicated", "cell_id": cid,
                              "detail": "another cell had this check cell's id; the check ran at the last "
                                        "cell with the id, and the earlier one was never run"})
        else:
            kept.append(cell)
    nb.cells = kept
    for i, cell in enumerate(nb.cells):
        cid = cell.get("id")
        if cid in checkers and cid not in seen:
            seen.add(cid)
            original = checkers[cid]
            if cell.cell_type != "code" or _norm(cell.source) != _norm(original.source):
                integrity.append({"kind": "checker_cell_edited", "cell_id": cid,
                                  "detail": "the check cell was changed; the grader used its own copy"})
            if cell.metadata.get("course") != original.metadata.get("course") or not is_checker(cell):
                integrity.append({"kind": "checker_cell_metadata_changed", "cell_id": cid,
                                  "detail": "the check cell's tags or metadata were changed; restored"})
            nb.cells[i] = _fresh_copy(original)
        elif is_checker(cell) or (cell.cell_type == "code" and _norm(cell.source) in checker_sources):
            extra.add(str(cid))
    order = [c.id for c in src_cells]
    for cid, original in checkers.items():
        if cid in seen:
            continue
        integrity.append({"kind": "checker_cell_missing", "cell_id": cid,
                          "detail": "the check cell was deleted; the grader put its own copy back"})
        position = len(nb.cells)
        present = [c.get("id") for c in nb.cells]
        for prev in reversed(order[: order.index(cid)]):
            if prev in present:
                position = present.index(prev) + 1
                break
        nb.cells.insert(position, _fresh_copy(original))
    return Restored(nb, integrity, extra)


def _fresh_copy(cell: nbformat.NotebookNode) -> nbformat.NotebookNode:
    new = copy.deepcopy(cell)
    new.outputs = []
    new.execution_count = None
    return new


def _norm(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
