"""Command line of the grader: grade, generate, check-sync (``python -m course_tools.grading --help``).

Exit codes: 0 when the command did its job (grading finished, even if every student failed;
exercises/ written or in sync), 1 when check-sync finds exercises/ out of date, 2 on usage errors
(no such path, nothing to grade) and when no operating-system sandbox is available for grading.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path

from course_tools.grading import notebooks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course_tools.grading", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("grade", help="grade one submitted notebook or a folder of them")
    g.add_argument("path", type=Path, help="a notebook, or a folder searched recursively for notebooks")
    g.add_argument("--out", type=Path, default=Path("grades"), help="folder for the reports (default: grades/)")
    g.add_argument("--workers", type=int, default=2, help="submissions graded at once (default: 2)")
    g.add_argument("--timeout", type=float, default=600, help="seconds allowed per notebook (default: 600)")
    g.add_argument("--cell-timeout", type=float, default=120,
                   help="seconds allowed per cell and per call of a check into the learner's code (default: 120)")
    g.add_argument("--memory-mb", type=int, default=4096, help="memory (address space) per kernel (default: 4096)")
    g.add_argument("--grader-memory-mb", type=int, default=8192,
                   help="memory (address space) of each grading process (default: 8192)")
    g.add_argument("--trust-submissions", action="store_true",
                   help="run the kernels without the operating-system sandbox: only for grading your own work")
    g.add_argument("--seed", type=int, default=None, help="seed of the checks' cases (default: a fresh one, recorded)")
    g.add_argument("--solutions", type=Path, default=notebooks.SOLUTIONS, help=argparse.SUPPRESS)

    gen = sub.add_parser("generate", help="write exercises/ (the student version) from solutions/")
    gen.add_argument("--solutions", type=Path, default=notebooks.SOLUTIONS)
    gen.add_argument("--exercises", type=Path, default=notebooks.EXERCISES)

    sync = sub.add_parser("check-sync", help="exit 1 when exercises/ differs from what generate would write")
    sync.add_argument("--solutions", type=Path, default=notebooks.SOLUTIONS)
    sync.add_argument("--exercises", type=Path, default=notebooks.EXERCISES)

    w = sub.add_parser("_worker", help=argparse.SUPPRESS)
    w.add_argument("--solutions", required=True)
    w.add_argument("--seed", type=int, required=True)
    w.add_argument("--timeout", type=float, required=True)
    w.add_argument("--cell-timeout", type=float, required=True)
    w.add_argument("--memory-mb", type=int, required=True)
    w.add_argument("--file-mb", type=int, default=256)
    w.add_argument("--grader-memory-mb", type=int, default=8192)
    w.add_argument("--kernel-tree", required=True)
    w.add_argument("--trust-submissions", action="store_true")

    args = parser.parse_args(argv)
    if args.command == "generate":
        report = notebooks.generate(args.solutions, args.exercises, write=True)
        for p in report.backups:
            print(f"kept your edited copy as {p}")
        for p in report.written:
            print(f"wrote {p}")
        for p in report.orphans:
            print(f"warning: {p} has no notebook in {args.solutions}", file=sys.stderr)
        if not report.written:
            print(f"{args.exercises} is up to date")
        return 0
    if args.command == "check-sync":
        report = notebooks.generate(args.solutions, args.exercises, write=False)
        problems = [f"out of date: {p}" for p in report.stale] + [f"missing: {p}" for p in report.missing] + [
            f"no source in {args.solutions}: {p}" for p in report.orphans]
        for line in problems:
            print(line)
        if problems:
            print("run: python course.py exercises   (or python -m course_tools.grading generate)")
            return 1
        print(f"{args.exercises} is in sync with {args.solutions}")
        return 0
    if args.command == "_worker":
        from course_tools.grading.batch import worker_main

        return worker_main(args)

    from course_tools.grading.batch import grade_batch
    from course_tools.grading.options import Options

    if not args.path.exists():
        parser.error(f"no such file or folder: {args.path}")
    if args.timeout <= 0 or args.cell_timeout <= 0 or args.workers < 1:
        parser.error("--timeout, --cell-timeout and --workers must be positive")
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    options = Options(timeout=args.timeout, cell_timeout=args.cell_timeout, memory_mb=args.memory_mb,
                      grader_memory_mb=args.grader_memory_mb, seed=seed, trust_submissions=args.trust_submissions)
    from course_tools.grading import isolation
    from course_tools.grading.batch import find_submissions

    if args.trust_submissions and os.name != "posix":
        print("error: grading needs a POSIX system (Linux, or macOS with --trust-submissions); on Windows, "
              "run it in WSL or a Linux container", file=sys.stderr)
        return 2
    if args.trust_submissions:
        print("warning: --trust-submissions: the notebooks run without the operating-system sandbox; "
              "grade only work you trust", file=sys.stderr)
    else:
        try:
            isolation.check_available()
        except isolation.SandboxUnavailable as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    found = find_submissions(args.path.absolute(), exclude=args.out.resolve())
    if not found:
        parser.error(f"no notebooks to grade in {args.path}")
    print(f"grading {len(found)} notebook(s) in {args.path} with seed {seed}; reports in {args.out}/", flush=True)
    rows = grade_batch(args.path, args.out, options, workers=args.workers, solutions=args.solutions)
    print(f"wrote {len(rows)} JSON files, {args.out / 'grades.csv'} and {args.out / 'grades.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
