"""A synthetic class: N submissions made from ``solutions/`` with seeded, realistic mistakes.

For the grader's tests and benchmarks, and for trying the instructor's report before a real class
hands anything in (``python course.py grade --synthetic N FOLDER``). Each learner gets, per exercise,
one of (rates in `MistakeRates`):

- ``correct``: the solution's code;
- ``wrong_constant``: the solution with one number in its code changed (an off-by-one, a wrong
  scale), chosen by the seed: some checks fail, some may still pass, and some code may crash;
- ``unfinished``: the student version's cell (``raise NotImplementedError``): 0 for that exercise;
- ``crash``: the code raises (an ``IndexError`` on its first line) whenever the checks call it;

and, per submission, rarely, a cell that never ends (``timeout``), a cell that ends the kernel
(``os._exit``), or the whole notebook replaced by an attack from the hostile corpus
(``tests/hostile/corpus.py``, for ``00_recap_exercises``). ``class.json`` records every choice, so
a report can be checked against what was planted.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import nbformat

from course_tools.grading import notebooks

HOSTILE = ("prints_passed", "monkeypatched_checker", "reads_solutions", "network", "kills_grader",
           "edited_checker", "forged_stride0", "survivor_children")  # corpus entries that grade in seconds
_NUMBER = re.compile(r"(?<![\w.])(\d+\.\d*|\d+)(?![\w.])")


@dataclass
class MistakeRates:
    wrong_constant: float = 0.12  # per exercise
    unfinished: float = 0.10  # per exercise
    crash: float = 0.06  # per exercise; the rest are correct
    timeout: float = 0.03  # per submission: a cell that never ends
    kernel_exit: float = 0.02  # per submission: a cell that ends the kernel
    hostile: float = 0.03  # per submission: an attack from the hostile corpus (00_recap_exercises only)


def _clean(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return nb


def _regions(source: str) -> list[int]:
    """Indices of the code lines inside ``### BEGIN SOLUTION`` ... ``### END SOLUTION``."""
    inside, found = False, []
    for i, line in enumerate(source.split("\n")):
        s = line.strip()
        if s.startswith("### BEGIN SOLUTION"):
            inside = True
        elif s.startswith("### END SOLUTION"):
            inside = False
        elif inside and s and not s.startswith("#"):
            found.append(i)
    return found


def wrong_constant(source: str, rng: random.Random) -> str | None:
    """The source with one number in a solution region changed, or None when there is none."""
    lines = source.split("\n")
    spots = [(i, m) for i in _regions(source) for m in _NUMBER.finditer(lines[i].split("#")[0])]
    if not spots:
        return None
    i, m = rng.choice(spots)
    text = m.group(0)
    new = str(int(text) + rng.choice((1, 2))) if "." not in text else repr(round(float(text) * rng.choice((0.5, 1.1, 2.0)), 6))
    lines[i] = lines[i][:m.start()] + new + lines[i][m.end():]
    return "\n".join(lines)


def crash(source: str) -> str | None:
    """The source with an ``IndexError`` raised on the first line of each solution region."""
    lines = source.split("\n")
    out, inside = [], False
    for line in lines:
        out.append(line)
        if line.strip().startswith("### BEGIN SOLUTION"):
            indent = line[: len(line) - len(line.lstrip())]
            out.append(f"{indent}first = [][0]  # IndexError: list index out of range")
    return "\n".join(out) if len(out) > len(lines) else None


def _exercise_cells(sol: nbformat.NotebookNode) -> list[tuple[str, str]]:
    """(exercise id, id of the solution cell before its check cell), in order."""
    found, last = [], None
    for cell in sol.cells:
        if cell.cell_type == "code" and "### BEGIN SOLUTION" in cell.source:
            last = cell.id
        if notebooks.is_checker(cell) and last is not None:
            found.append((notebooks.exercise_of(cell), last))
    return found


def _hostile(root: Path) -> dict[str, nbformat.NotebookNode]:
    """The corpus's quick attacks on ``00_recap_exercises``, when the course's tests are present."""
    path = root / "tests" / "hostile" / "corpus.py"
    if not path.exists():
        return {}
    spec = importlib.util.spec_from_file_location("course_hostile_corpus", path)
    corpus = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = corpus  # its dataclasses look their module up
    spec.loader.exec_module(corpus)
    with tempfile.TemporaryDirectory() as tmp:
        built = corpus.build(Path(tmp) / "corpus", Path(tmp) / "reports")
        return {k: nbformat.read(built[k], as_version=4) for k in HOSTILE if k in built}


def make_class(n: int, out: Path, seed: int = 0, names: list[str] | None = None,
               rates: MistakeRates | None = None, solutions: Path = notebooks.SOLUTIONS,
               exercises: Path = notebooks.EXERCISES) -> dict:
    """Write ``n`` submissions into ``out`` (``learner00001_<notebook>.ipynb``, notebooks taken in turn
    from ``names``, default every solution notebook) and ``out/class.json``; returns the manifest."""
    if n < 1:
        raise ValueError(f"a synthetic class needs at least 1 submission (got {n})")
    rates = rates or MistakeRates()
    available = sorted(p.stem for p in Path(solutions).glob("*.ipynb"))
    names = names or available
    unknown = [x for x in names if x not in available]
    if unknown:
        raise ValueError(f"no solution notebook named {unknown} in {solutions}; choose from {available}")
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sols = {x: _clean(nbformat.read(Path(solutions) / f"{x}.ipynb", as_version=4)) for x in names}
    stus = {x: _clean(nbformat.read(Path(exercises) / f"{x}.ipynb", as_version=4)) for x in names}
    hostile = _hostile(notebooks.ROOT) if "00_recap_exercises" in names and rates.hostile > 0 else {}
    manifest = {"seed": seed, "n": n, "rates": asdict(rates), "submissions": {}}
    for i in range(n):
        name = names[i % len(names)]
        nb = nbformat.from_dict(json.loads(json.dumps(sols[name])))  # a deep copy
        cells = {c.id: c for c in nb.cells}
        stub = {c.id: c for c in stus[name].cells}
        planted: dict = {"notebook": name, "exercises": {}, "extra": None}
        r = rng.random()
        if hostile and r < rates.hostile:
            kind = rng.choice(sorted(hostile))
            nb = hostile[kind]
            planted["extra"] = f"hostile:{kind}"
        else:
            for ex_id, cell_id in _exercise_cells(nb):
                u, kind = rng.random(), "correct"
                if u < rates.wrong_constant:
                    changed = wrong_constant(cells[cell_id].source, rng)
                    if changed is not None:
                        cells[cell_id].source, kind = changed, "wrong_constant"
                elif u < rates.wrong_constant + rates.unfinished and cell_id in stub:
                    cells[cell_id].source, kind = stub[cell_id].source, "unfinished"
                elif u < rates.wrong_constant + rates.unfinished + rates.crash:
                    changed = crash(cells[cell_id].source)
                    if changed is not None:
                        cells[cell_id].source, kind = changed, "crash"
                planted["exercises"][ex_id] = kind
            checks = [c for c in nb.cells if notebooks.is_checker(c)]
            r = rng.random()
            extra = None
            if r < rates.timeout:
                extra, code = "timeout", "while True:  # a loop that never ends\n    pass"
            elif r < rates.timeout + rates.kernel_exit:
                extra, code = "kernel_exit", "import os\nos._exit(1)  # the kernel ends here"
            if extra and checks:
                at = nb.cells.index(rng.choice(checks))
                cell = nbformat.v4.new_code_cell(code)
                cell.id = f"learner-{extra.replace('_', '-')}"
                nb.cells.insert(at + 1, cell)
                planted["extra"] = extra
        file = f"learner{i + 1:05d}_{name}.ipynb"
        nbformat.write(nb, out / file)
        manifest["submissions"][file] = planted
    (out / "class.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest
