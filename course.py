#!/usr/bin/env python3
"""The course's one entry point. Needs only Python 3.10+ (standard library) to start.

    python3 course.py lab          set up .venv if needed, then open the course in JupyterLab
    python3 course.py test         set up .venv if needed, then run the whole test suite
    python3 course.py execute [NB...]   re-execute notebooks in place (all lessons and solutions by default)
    python3 course.py exercises    regenerate exercises/ (the student version) from solutions/
    python3 course.py grade PATH   grade one submitted notebook or a folder of them
    python3 course.py train        train every model of the tiny Stable Diffusion from scratch
    python3 course.py bench        run every benchmark in benchmarks/
    python3 course.py gpu          run the test suite, every lesson and the benchmarks on CUDA
    python3 course.py gpu --check  the timed GPU check (benchmarks/gpu_check.py; on CPU a dry run)
    python3 course.py colab        write the repository (pyproject.toml) into every setup cell and badge

Extra arguments after the command are passed on (to pytest, jupyter lab, the grader, ...).
Setup installs the pinned, known-good package set (requirements/constraints.txt) into .venv.
It installs torch==2.13.0 only when the environment has no torch yet; set COURSE_TORCH to another
pip requirement (for example "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu")
to choose a different build.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
# The known-good pinned set; Python 3.10 has its own (the newest numpy, scipy, matplotlib ... need 3.11).
CONSTRAINTS = ROOT / "requirements" / ("constraints-py310.txt" if sys.version_info < (3, 11) else "constraints.txt")
STAMP = VENV / ".course_stamp"
DEFAULT_TORCH = "torch==2.13.0"


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def run(cmd: list, **kwargs) -> int:
    print("+", " ".join(shlex.quote(str(c)) for c in cmd), flush=True)
    return subprocess.call([str(c) for c in cmd], cwd=kwargs.pop("cwd", ROOT), **kwargs)


def check(cmd: list) -> None:
    code = run(cmd)
    if code != 0:
        sys.exit(f"course.py: command failed with exit code {code}: {' '.join(map(str, cmd))}")


def setup_stamp() -> str:
    h = hashlib.sha256()
    for path in (ROOT / "pyproject.toml", CONSTRAINTS):
        h.update(path.read_bytes())
    h.update(os.environ.get("COURSE_TORCH", DEFAULT_TORCH).encode())
    return h.hexdigest()


def ensure_env() -> Path:
    """Create .venv and install the course into it, unless it is already up to date."""
    if sys.version_info < (3, 10):
        sys.exit(f"course.py needs Python 3.10 or newer; this is {sys.version.split()[0]}")
    py = venv_python()
    if not py.exists():
        print(f"Creating a virtual environment in {VENV} ...", flush=True)
        check([sys.executable, "-m", "venv", VENV])
    if STAMP.exists() and STAMP.read_text().strip() == setup_stamp():
        return py
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check"]
    has_torch = subprocess.call([str(py), "-c", "import torch"], stderr=subprocess.DEVNULL) == 0
    if not has_torch:
        # Installed on its own first so that no other requirement can pull in a different torch build.
        check(pip + shlex.split(os.environ.get("COURSE_TORCH", DEFAULT_TORCH)))
    # The library (what Colab also installs) plus the lab extra (JupyterLab, kernel, notebook tools) and dev (tests).
    check(pip + ["-c", CONSTRAINTS, "-e", ".[lab,dev]"])
    STAMP.write_text(setup_stamp())
    return py


def lab_command(py: Path, args: list) -> list:
    """The JupyterLab command line; as root (a container, a cloud VM) with --allow-root, which Jupyter
    otherwise demands before it starts."""
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    extra = ["--allow-root"] if root and "--allow-root" not in args else []
    return [py, "-m", "jupyter", "lab", *extra, "--notebook-dir", ROOT, ROOT / "notebooks" / "00_welcome.ipynb", *args]


def cmd_lab(args: list) -> int:
    py = ensure_env()
    return run(lab_command(py, args))


def cmd_test(args: list) -> int:
    py = ensure_env()
    env = dict(os.environ, COURSE_PROGRESS="0", PYTHONHASHSEED="0")
    # Two workers: one notebook kernel per worker; --dist loadscope keeps each notebook on one kernel.
    workers = env.get("COURSE_TEST_WORKERS", "2")
    xdist = [] if workers == "0" else ["-n", workers, "--dist", "loadscope"]
    if workers not in ("0", "1"):
        # One thread per worker (and per notebook kernel): two workers on two cores, not four threads
        # fighting over two cores, which makes small tensor ops many times slower.
        env.setdefault("OMP_NUM_THREADS", "1")
    return run([py, "-m", "pytest", *xdist, *args], env=env)


def cmd_module(module: str):
    def runner(args: list) -> int:
        py = ensure_env()
        return run([py, "-m", module, *args])
    return runner


def cmd_bench(args: list) -> int:
    py = ensure_env()
    failures = 0
    for script in sorted((ROOT / "benchmarks").glob("bench_*.py")):
        failures += run([py, script, *args]) != 0
    return 1 if failures else 0


CUDA_PROBE = """import shutil, torch
print("cuda" if torch.cuda.is_available() else
      "cpu-only" if torch.version.cuda is None and shutil.which("nvidia-smi") else "none", torch.__version__)"""


def cuda_problem(py: Path) -> str | None:
    """None when .venv's torch sees a GPU; otherwise what is wrong, and the fix."""
    out = subprocess.run([str(py), "-c", CUDA_PROBE], capture_output=True, text=True).stdout.split()
    state, version = (out + ["none", "?"])[:2]
    if state == "cuda":
        return None
    if state == "cpu-only":
        return (f"this machine has an NVIDIA GPU, but .venv holds a CPU-only torch ({version}), and setup never\n"
                "replaces an installed torch. Replace it with a CUDA build, then run this command again:\n"
                "    .venv/bin/python -m pip uninstall -y torch\n"
                '    COURSE_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130" \\\n'
                "        python3 course.py gpu\n"
                "(choose the CUDA version your driver supports: nvidia-smi shows it; pytorch.org lists the builds)")
    return f"CUDA is not available on this machine (torch {version}: no NVIDIA GPU or driver found)"


def cmd_gpu(args: list) -> int:
    """The test suite, every lesson under nbval, and the benchmarks on CUDA (for a machine that has a GPU).

    ``--check`` runs benchmarks/gpu_check.py instead: the timed check that reports each step, and on a
    machine without CUDA a dry run that says what it skipped and why."""
    py = ensure_env()
    if "--check" in args:
        rest = [a for a in args if a != "--check"]
        return run([py, ROOT / "benchmarks" / "gpu_check.py", *rest], env=dict(os.environ, COURSE_PROGRESS="0"))
    problem = cuda_problem(py)
    if problem:
        sys.exit(f"course.py gpu: {problem}")
    # NVIDIA_TF32_OVERRIDE=0: no TF32 in cuBLAS and cuDNN in any process (the notebook kernels too), so that
    # comparisons at float32 tolerance mean what they say; tests/conftest.py also turns TF32 off in torch.
    env = dict(os.environ, COURSE_DEVICE="cuda", COURSE_PROGRESS="0", NVIDIA_TF32_OVERRIDE="0")
    # tests/ (the solutions and the student notebooks run inside tests/test_exercises.py) and every lesson.
    # (Not the browser test, nor the Colab-like environment, which has nothing to do with the GPU.)
    code = run([py, "-m", "pytest", "tests", "notebooks", "-m", "not browser",
                "--deselect", "tests/test_colab_like.py::test_colab_like_environment", *args], env=env)
    for script in sorted((ROOT / "benchmarks").glob("bench_*.py")):
        code |= run([py, script], env=env)  # on $COURSE_DEVICE; results go to artifacts/, never assets/
    return code


COMMANDS = {
    "lab": cmd_lab,
    "test": cmd_test,
    "execute": cmd_module("course_tools.execute"),
    "exercises": lambda args: cmd_module("course_tools.grading")(["generate", *args]),
    "grade": lambda args: cmd_module("course_tools.grading")(["grade", *args]),
    "train": cmd_module("course_lib.train"),
    "bench": cmd_bench,
    "gpu": cmd_gpu,
    "colab": cmd_module("course_tools.colab_setup"),
    "setup": lambda args: (ensure_env(), 0)[1],
}


def main(argv: list) -> int:
    if not argv or argv[0] in ("-h", "--help", "help") or argv[0] not in COMMANDS:
        print(__doc__)
        if argv and argv[0] not in ("-h", "--help", "help"):
            print(f"unknown command {argv[0]!r}; choose one of: {', '.join(COMMANDS)}")
            return 2
        return 0
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
