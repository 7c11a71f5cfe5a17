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
    g.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="grade on an existing Dask cluster (tcp://host:8786) instead of a local one")
    g.add_argument("--local-pool", action="store_true",
                   help="grade with the plain local pool of grading processes instead of a local Dask cluster")
    g.add_argument("--no-report", action="store_true", help="skip report.md and feedback/ (the JSON, CSV and "
                                                             "Markdown tables are always written)")
    g.add_argument("--synthetic", type=int, default=None, metavar="N",
                   help="write a synthetic class of N submissions into PATH (from solutions/, with seeded "
                        "mistakes; see course_tools/grading/synthetic.py) instead of grading")
    g.add_argument("--notebook", action="append", default=None,
                   help="with --synthetic: only this solution notebook (repeatable; default: all)")

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
    w.add_argument("--parent-pid", type=int, default=0)

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

    from course_tools.grading.batch import Journal
    from course_tools.grading.options import Options

    if args.synthetic is not None:
        from course_tools.grading.synthetic import make_class

        try:
            made = make_class(args.synthetic, args.path, seed=args.seed or 0, names=args.notebook,
                              solutions=args.solutions)
        except ValueError as err:
            parser.error(str(err))
        kinds: dict[str, int] = {}
        for planted in made["submissions"].values():
            for k in list(planted["exercises"].values()) + [planted["extra"] or "-"]:
                kinds[k] = kinds.get(k, 0) + 1
        print(f"wrote {args.synthetic} submissions and class.json to {args.path} (seed {made['seed']}); "
              + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()) if k != "-"))
        return 0
    if not args.path.exists():
        parser.error(f"no such file or folder: {args.path}")
    if args.timeout <= 0 or args.cell_timeout <= 0 or args.workers < 1:
        parser.error("--timeout, --cell-timeout and --workers must be positive")
    if args.scheduler and args.local_pool:
        parser.error("--scheduler and --local-pool exclude each other: choose a Dask cluster or the local pool")
    earlier = Journal.seed_of(args.out.resolve())
    seed = args.seed if args.seed is not None else earlier if earlier is not None else secrets.randbelow(2**31)
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
    elif not args.scheduler:  # on a cluster, each Dask worker checks its own sandbox
        try:
            isolation.check_available()
        except isolation.SandboxUnavailable as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    found = find_submissions(args.path.absolute(), exclude=args.out.resolve())
    if not found:
        parser.error(f"no notebooks to grade in {args.path}")
    where = (f"the Dask cluster at {args.scheduler}" if args.scheduler else
             f"{args.workers} local grading process(es)" if args.local_pool else
             f"a local Dask cluster of {args.workers} worker(s)")
    resumed = " (continuing the batch already in that folder)" if args.seed is None and earlier is not None else ""
    print(f"grading {len(found)} notebook(s) in {args.path} with seed {seed} on {where}; reports in "
          f"{args.out}/{resumed}", flush=True)
    if args.local_pool:
        from course_tools.grading.batch import grade_batch

        rows = grade_batch(args.path, args.out, options, workers=args.workers, solutions=args.solutions,
                           report=not args.no_report)
    else:
        from course_tools.grading.distributed import grade_batch_dask

        rows = grade_batch_dask(args.path, args.out, options, workers=args.workers, solutions=args.solutions,
                                scheduler=args.scheduler, report=not args.no_report)
    extra = "" if args.no_report else f", {args.out / 'report.md'} and feedback/"
    print(f"wrote {len(rows)} JSON files, {args.out / 'grades.csv'}, {args.out / 'grades.md'}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
