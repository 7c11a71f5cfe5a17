"""Grading time of plain submissions: the grader in its operating-system sandbox against the grader
before the sandbox (an in-process audit hook, Jupyter's kernel over ZeroMQ), side by side in one run.

    .venv/bin/python benchmarks/bench_grader.py                  # 6 solved notebooks, 2 workers, 2 rounds
    .venv/bin/python benchmarks/bench_grader.py --n 2 --rounds 1 --baseline 23d5684

The baseline is the grader at ``--baseline`` (a commit before the sandbox), taken with its own course
files (``git archive``), so that each side grades the notebook its own checks were written for. Both
sides grade the same number of copies of ``solutions/00_recap_exercises.ipynb`` with the same
workers, alternating, round after round. Reported: the mean seconds per submission (from the
reports: kernel start, cells, checks) and the wall time of the whole command (with the batch's own
start: copies of the course, the kernel tree, the grading processes). ratio = sandbox / baseline:
the course's bar is at most 1.5 per submission.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAME = "00_recap_exercises"
BASELINE = "23d5684"  # the last commit whose grader ran kernels without the operating-system sandbox


def grade(tree: Path | None, folder: Path, out: Path, workers: int) -> tuple[float, list[float]]:
    """Grade ``folder`` with the grader of ``tree`` (None: this checkout); (wall seconds, per submission)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if tree is not None:
        env.update({"PYTHONPATH": str(tree), "COURSE_ROOT": str(tree)})
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "course_tools.grading", "grade", str(folder), "--out", str(out),
                           "--workers", str(workers), "--seed", "1"], cwd=tree or ROOT, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"grading failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    bad = [(r["submission"], r["status"], r["score"]) for r in rows if r["status"] != "graded" or r["score"] != r["max_score"]]
    if bad or not rows:
        raise SystemExit(f"a plain submission was not graded as solved: {bad}")
    return wall, [r["seconds"] for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=6, help="submissions per batch (default: 6)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="batches per side, alternating (default: 2)")
    parser.add_argument("--baseline", default=BASELINE, help=f"commit of the grader to compare with (default: {BASELINE})")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-grader-"))
    try:
        base = work / "baseline"
        base.mkdir()
        archive = subprocess.run(["git", "archive", args.baseline, "course_lib", "course_tools", "solutions", "weights"],
                                 cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
        sides = {"baseline": base, "sandbox": None}
        for side, tree in sides.items():
            folder = work / f"subs-{side}"
            folder.mkdir()
            for i in range(args.n):
                shutil.copyfile((tree or ROOT) / "solutions" / f"{NAME}.ipynb", folder / f"s{i}_{NAME}.ipynb")
        walls: dict[str, list[float]] = {s: [] for s in sides}
        per: dict[str, list[float]] = {s: [] for s in sides}
        for r in range(args.rounds):
            for side, tree in sides.items():
                wall, seconds = grade(tree, work / f"subs-{side}", work / f"out-{side}-{r}", args.workers)
                walls[side].append(wall)
                per[side] += seconds
                print(f"round {r + 1} {side:>8}: {wall:6.1f} s for {args.n} submissions, "
                      f"per submission {statistics.mean(seconds):.2f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    mean = {s: statistics.mean(v) for s, v in per.items()}
    wall = {s: statistics.median(v) for s, v in walls.items()}
    print(f"\n| | baseline ({args.baseline}) | sandbox | ratio |\n| --- | ---: | ---: | ---: |")
    print(f"| seconds per submission (mean of {len(per['sandbox'])}) | {mean['baseline']:.2f} | "
          f"{mean['sandbox']:.2f} | {mean['sandbox'] / mean['baseline']:.2f} |")
    print(f"| wall time of a batch of {args.n}, {args.workers} workers (median) | {wall['baseline']:.1f} | "
          f"{wall['sandbox']:.1f} | {wall['sandbox'] / wall['baseline']:.2f} |")


if __name__ == "__main__":
    main()
