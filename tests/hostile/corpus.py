"""A corpus of wrong and adversarial submissions of ``00_recap_exercises``, and what each must get.

The notebooks are built from the current solution and exercise notebooks, so they never go stale:

    python tests/hostile/corpus.py OUT_DIR      # write them, then: python course.py grade OUT_DIR

tests/test_grader.py grades them all in one batch and checks every row against `EXPECTED`.
Scores: the notebook has 28 points: schedule_comparator 9, noise_predictor_evaluator 11,
unet_analyser 8.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[2]
NAME = "00_recap_exercises"


@dataclass
class Expect:
    status: str
    score: float
    flags: set[str] = field(default_factory=set)  # integrity kinds that must be reported
    why: str = ""


EXPECTED: dict[str, Expect] = {
    "solved": Expect("graded", 28, why="the solution, outputs stripped"),
    "unsolved": Expect("graded", 0, why="the student version as generated"),
    "partial": Expect("graded", 9, why="only the schedule comparator written"),
    "infinite_loop": Expect("timeout", 28, why="a cell that loops forever and ignores interrupts: killed, a fresh "
                                               "kernel replays the earlier cells, the rest is graded"),
    "slow_method": Expect("timeout", 27, why="random_predictor never returns: that check fails, the others pass"),
    "os_exit": Expect("kernel_died", 28, why="os._exit in a cell: a fresh kernel goes on"),
    "os_exit_in_check": Expect("kernel_died", 20, why="os._exit inside zero_predictor, during the checks"),
    "edited_checker": Expect("graded", 19, {"checker_cell_edited"},
                             why="ex 1 unsolved, its check cell replaced by print('All checks passed')"),
    "deleted_checker": Expect("graded", 17, {"checker_cell_missing"}, why="ex 2 unsolved, its check cell deleted"),
    "monkeypatched_checker": Expect("graded", 0, {"forbidden_import"},
                                    why="patches course_lib.checks/checking, torch.allclose and the grader's agent"),
    "prints_passed": Expect("graded", 0, why="prints 'passed' and carries fake passing outputs in the file"),
    "reads_solutions": Expect("graded", 0, {"forbidden_read", "subprocess"},
                              why="reads solutions/ (open, listdir, cat) to exec the solutions"),
    "huge_output": Expect("graded", 28, why="prints 20 MB and tries to write a 1 GB file"),
    "one_seed": Expect("graded", 20, why="ex 3 answered from a table of the notebook's own seeds"),
    "syntax_error": Expect("graded", 17, why="a syntax error in ex 2's cell"),
    "out_of_memory": Expect("out_of_memory", 28, why="a cell allocates 16 GB"),
    "kills_grader": Expect("graded", 28, {"signal"}, why="tries to SIGKILL the grader's process"),
    "not_a_notebook": Expect("invalid", 0, why="not JSON"),
}


def _load(kind: str) -> nbformat.NotebookNode:
    nb = nbformat.read(ROOT / kind / f"{NAME}.ipynb", as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return nb


def _cell(nb, cell_id: str):
    return next(c for c in nb.cells if c.get("id") == cell_id)


def _insert_after(nb, cell_id: str, source: str, new_id: str) -> None:
    i = [c.get("id") for c in nb.cells].index(cell_id)
    cell = nbformat.v4.new_code_cell(source)
    cell.id = new_id
    nb.cells.insert(i + 1, cell)


def _mix(solved_ids: set[str]) -> nbformat.NotebookNode:
    """The exercise notebook with the solution cells of some exercises."""
    nb, sol = _load("exercises"), _load("solutions")
    for cid in solved_ids:
        _cell(nb, cid).source = _cell(sol, cid).source
    return nb


EX1, EX2, EX3 = ("schedule-comparator", "noise-predictor-evaluator", "unet-analyser")


def one_seed_cheat() -> str:
    """A UNetAnalyzer that answers from a table of the cases the notebook's own seeds draw."""
    from course_tools.checking import FEEDBACK_SEEDS, Run
    from course_lib.checks.recap import UNET, _configs, unet_levels

    run = Run(None, UNET, FEEDBACK_SEEDS)
    levels = {(i, tuple(c), r): unet_levels(i, c, r) for i, c, r in _configs(run)}
    rng = run.rng(5)
    convs = {}
    for _ in range(4):
        ci, co, k = (int(v) for v in (rng.integers(1, 300), rng.integers(1, 300), rng.choice([1, 3, 4, 5])))
        convs[(ci, co, k)] = co * ci * k * k + co
    return f'''# Answers copied from what the check cell asked for. Right for the notebook's seeds only.
LEVELS = {levels!r}
CONVS = {convs!r}


class UNetAnalyzer:
    def __init__(self, in_ch, channel_config):
        self.key = (in_ch, tuple(channel_config))

    def conv_params(self, c_in, c_out, kernel=3):
        return CONVS.get((c_in, c_out, kernel), 0)

    def analyze(self, input_res=64):
        return LEVELS.get((*self.key, input_res), [])

    def decoder_share(self, input_res=64):
        lv = self.analyze(input_res)
        return sum(x["params"] for x in lv if x["name"].startswith("dec_")) / max(1, sum(x["params"] for x in lv))
'''


def build(out: Path) -> dict[str, Path]:
    """Write every notebook of the corpus into ``out``; returns {name: path}."""
    out.mkdir(parents=True, exist_ok=True)
    all_solved = {f"{e}-solution" for e in (EX1, EX2, EX3)}
    nbs: dict[str, nbformat.NotebookNode] = {}

    nbs["solved"] = _load("solutions")
    nbs["unsolved"] = _load("exercises")
    nbs["partial"] = _mix({f"{EX1}-solution"})

    nb = _mix(all_solved)
    _insert_after(nb, f"{EX1}-check", "import time\nwhile True:  # and no interrupt gets out\n    try:\n"
                                      "        time.sleep(0.1)\n    except KeyboardInterrupt:\n        pass",
                  "hostile-loop")
    nbs["infinite_loop"] = nb

    nb = _mix(all_solved)
    c = _cell(nb, f"{EX2}-solution")
    c.source = c.source.replace("        return torch.randn_like(xt)", "        while True:\n            pass")
    nbs["slow_method"] = nb

    nb = _mix(all_solved)
    _insert_after(nb, f"{EX1}-check", "import os\nos._exit(3)", "hostile-exit")
    nbs["os_exit"] = nb

    nb = _mix(all_solved)
    c = _cell(nb, f"{EX2}-solution")
    c.source = c.source.replace("        return torch.zeros_like(xt)", "        import os\n        os._exit(1)")
    nbs["os_exit_in_check"] = nb

    nb = _mix({f"{EX2}-solution", f"{EX3}-solution"})
    _cell(nb, f"{EX1}-check").source = 'print("All checks passed.")'
    nbs["edited_checker"] = nb

    nb = _mix({f"{EX1}-solution", f"{EX3}-solution"})
    nb.cells = [c for c in nb.cells if c.get("id") != f"{EX2}-check"]
    nbs["deleted_checker"] = nb

    nb = _mix(set())
    _insert_after(nb, "setup", '''import numpy as np
import sys, types
torch.allclose = lambda *a, **k: True
np.allclose = lambda *a, **k: True
np.testing.assert_allclose = lambda *a, **k: None
try:
    import course_lib.checks as checks
    checks.check = lambda *a, **k: print("All checks passed.")
except ImportError as err:
    print("blocked:", err)
try:
    import course_tools.checking as checking
    checking.Run.close = lambda *a, **k: None
    checking.Run.equal = lambda *a, **k: None
    checking.Run.expect = lambda *a, **k: None
except ImportError as err:
    print("blocked:", err)
fake = types.ModuleType("_course_agent")
fake.serve = lambda req, rep: open(rep, "wb").write(b"not a reply")
sys.modules["_course_agent"] = fake''', "hostile-patch")
    nbs["monkeypatched_checker"] = nb

    nb = _mix(set())
    _insert_after(nb, "setup", 'for _ in range(3):\n    print("All checks passed. 28/28 points")', "hostile-print")
    for cell in nb.cells:
        if "checker" in cell.metadata.get("tags", []):
            cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="All checks passed.\n")]
            cell.execution_count = 1
    nbs["prints_passed"] = nb

    nb = _mix(set())
    _insert_after(nb, "setup", '''import json, os, subprocess
from pathlib import Path
import course_lib
solutions = Path(course_lib.__file__).resolve().parents[1] / "solutions"
for attempt in (lambda: os.listdir(solutions),
                lambda: subprocess.run(["cat", str(solutions / "00_recap_exercises.ipynb")], capture_output=True),
                lambda: exec(compile("\\n".join(c["source"] if isinstance(c["source"], str) else "".join(c["source"])
                                              for c in json.load(open(solutions / "00_recap_exercises.ipynb"))["cells"]
                                              if c["cell_type"] == "code" and "checker" not in c["metadata"].get("tags", [])),
                                     "solutions", "exec"), globals())):
    try:
        attempt()
    except Exception as err:
        print(type(err).__name__, err)''', "hostile-read")
    nbs["reads_solutions"] = nb

    nb = _mix(all_solved)
    _insert_after(nb, f"{EX1}-check", '''line = "x" * 100_000
for _ in range(200):
    print(line)
try:
    with open("big.bin", "wb") as f:
        for _ in range(1024):
            f.write(b"0" * 2**20)
except OSError as err:
    print(err)''', "hostile-output")
    nbs["huge_output"] = nb

    nb = _mix({f"{EX1}-solution", f"{EX2}-solution"})
    _cell(nb, f"{EX3}-solution").source = one_seed_cheat()
    nbs["one_seed"] = nb

    nb = _mix(all_solved)
    c = _cell(nb, f"{EX2}-solution")
    c.source = c.source.replace("def zero_predictor(self, xt, t):", "def zero_predictor(self, xt, t)")
    nbs["syntax_error"] = nb

    nb = _mix(all_solved)
    _insert_after(nb, f"{EX1}-check", "big = torch.ones(2**32)  # 16 GB of float32", "hostile-oom")
    nbs["out_of_memory"] = nb

    nb = _mix(all_solved)
    _insert_after(nb, f"{EX1}-check", "import os, signal\nfor pid in (os.getppid(), 1):\n    try:\n"
                                      "        os.kill(pid, signal.SIGKILL)\n    except PermissionError as err:\n"
                                      "        print(err)", "hostile-kill")
    nbs["kills_grader"] = nb

    paths = {}
    for name, nb in nbs.items():
        paths[name] = out / f"{name}_{NAME}.ipynb"
        nbformat.write(nb, paths[name])
    paths["not_a_notebook"] = out / f"not_a_notebook_{NAME}.ipynb"
    paths["not_a_notebook"].write_text("{ this is not json")
    assert set(paths) == set(EXPECTED), set(paths) ^ set(EXPECTED)
    return paths


if __name__ == "__main__":
    for name, path in build(Path(sys.argv[1] if len(sys.argv) > 1 else "hostile_corpus")).items():
        print(f"{path}: {EXPECTED[name].why}")
