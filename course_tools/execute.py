"""Re-execute the course's notebooks in place, the way the test suite runs them.

    python course.py execute                      # every lesson and solution notebook
    python course.py execute notebooks/00_welcome.ipynb

Each notebook runs in a fresh kernel from its own folder, with progress bars off so that the
stored outputs stay small; the run time of each notebook is printed at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FOLDERS = ("notebooks", "solutions")


def execute_notebook(path: Path, timeout: int = 600, kernel_name: str = "python3") -> float:
    """Run ``path`` top to bottom in a new kernel and save it with its outputs. Returns seconds taken."""
    nb = nbformat.read(path, as_version=4)
    os.environ.setdefault("COURSE_PROGRESS", "0")
    client = NotebookClient(nb, timeout=timeout, kernel_name=kernel_name,
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    nbformat.write(nb, path)
    return seconds


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(prog="course.py execute", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", type=Path, help="notebooks to run (default: notebooks/ and solutions/)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds allowed per cell")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted(p for f in DEFAULT_FOLDERS for p in (ROOT / f).glob("*.ipynb"))
    missing = [p for p in paths if not p.exists()]
    if missing:
        parser.error(f"no such notebook: {', '.join(map(str, missing))}")
    times = {}
    for path in paths:
        print(f"executing {path} ...", flush=True)
        try:
            times[path] = execute_notebook(path.resolve(), timeout=args.timeout)
        except Exception as err:  # report and go on: one broken notebook should not hide the others
            print(f"  FAILED: {type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}")
            times[path] = float("nan")
    print("\nnotebook run times")
    for path, seconds in times.items():
        print(f"  {seconds:7.1f} s  {path}")
    return 1 if any(s != s for s in times.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
