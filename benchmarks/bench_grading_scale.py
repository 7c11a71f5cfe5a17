"""How the grader scales on Dask: throughput with 1 and 2 workers, Dask's overhead, a paper estimate.

    python benchmarks/bench_grading_scale.py [--n 200] [--workers 1 2] [--overhead-n 40] [--out artifacts/grading_scale]

1. Writes a synthetic class of ``--n`` submissions of ``00_recap_exercises`` (course_tools/grading/synthetic.py:
   seeded wrong answers, crashes, endless loops, attacks from the hostile corpus).
2. Grades it on a local Dask cluster with each worker count in ``--workers`` (a fresh output folder
   each time): submissions per minute, seconds per submission.
3. Grades a class of ``--overhead-n`` with the plain local pool and on Dask, same worker count, side by
   side, and checks that both give the same status, score and checks for every submission.
4. From the measured cost of one submission (core-seconds), a paper estimate for 10,000 submissions on
   a cluster of ``--cluster-machines`` machines of ``--cluster-cores`` cores (one worker per two cores,
   as docs/grading.md advises).

Writes ``OUT/grading_scale.json`` (after each phase, so an interrupted run keeps what it measured) and,
in ``OUT/report/``, the instructor's report of the class graded with the most workers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from course_tools.grading.batch import grade_batch  # noqa: E402
from course_tools.grading.distributed import grade_batch_dask  # noqa: E402
from course_tools.grading.options import Options  # noqa: E402
from course_tools.grading.synthetic import make_class  # noqa: E402


def essentials(rows: list[dict]) -> dict:
    """What must agree between two runs, submission by submission (no timings)."""
    return {r["key"]: (r["status"], r["score"], [(e["exercise_id"], e["status"], [(c["name"], c["earned"], c["passed"])
                                                                                for c in e["checks"]])
                                                 for e in r["exercises"]]) for r in rows}


def timed(fn, *args, **kwargs) -> tuple[list[dict], float]:
    start = time.monotonic()
    rows = fn(*args, **kwargs)
    return rows, time.monotonic() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--overhead-n", type=int, default=40)
    p.add_argument("--overhead-workers", type=int, default=2)
    p.add_argument("--cell-timeout", type=float, default=6)
    p.add_argument("--timeout", type=float, default=150)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--cluster-machines", type=int, default=10)
    p.add_argument("--cluster-cores", type=int, default=32)
    p.add_argument("--out", type=Path, default=ROOT / "artifacts" / "grading_scale")
    args = p.parse_args()
    if args.n < 1 or args.overhead_n < 0 or min(args.workers) < 1:
        p.error("--n and --workers must be at least 1, --overhead-n at least 0")
    out = args.out.resolve()
    shutil.rmtree(out / "work", ignore_errors=True)
    work = out / "work"
    work.mkdir(parents=True)
    options = Options(timeout=args.timeout, cell_timeout=args.cell_timeout, seed=args.seed)
    result: dict = {"n": args.n, "seed": args.seed, "cpus": os.cpu_count(), "load_average_at_start": os.getloadavg(),
                    "cell_timeout": args.cell_timeout, "throughput": {}, "overhead": None}

    def save():
        (out / "grading_scale.json").write_text(json.dumps(result, indent=1) + "\n")

    made = make_class(args.n, work / "class", seed=args.seed, names=["00_recap_exercises"])
    result["planted"] = {}
    for planted in made["submissions"].values():
        for k in list(planted["exercises"].values()) + [planted["extra"] or "none"]:
            result["planted"][k] = result["planted"].get(k, 0) + 1
    reference = None
    for w in args.workers:
        rows, wall = timed(grade_batch_dask, work / "class", work / f"dask-{w}", options, workers=w, progress=True)
        per = [r["seconds"] for r in rows]
        result["throughput"][str(w)] = {"wall_s": round(wall, 1), "per_minute": round(60 * len(rows) / wall, 2),
                                        "mean_submission_s": round(sum(per) / len(per), 2),
                                        "statuses": {s: sum(r["status"] == s for r in rows) for s in {r["status"] for r in rows}},
                                        "load_average_after": os.getloadavg()}
        if reference is not None:
            result["throughput"][str(w)]["same_results_as_1st_run"] = essentials(rows) == reference
        reference = reference or essentials(rows)
        print(f"Dask, {w} worker(s): {len(rows)} submissions in {wall:.1f} s, {60 * len(rows) / wall:.1f}/min",
              flush=True)
        save()
    best = max(args.workers)
    shutil.rmtree(out / "report", ignore_errors=True)
    (out / "report").mkdir()
    for f in ["report.md", "report_totals.png", "report_exercises.png", "report_checks.png", "grades.md", "grades.csv"]:
        if (work / f"dask-{best}" / f).exists():
            shutil.copy(work / f"dask-{best}" / f, out / "report" / f)

    if args.overhead_n:
        make_class(args.overhead_n, work / "small", seed=args.seed + 1, names=["00_recap_exercises"])
        w = args.overhead_workers
        local, t_local = timed(grade_batch, work / "small", work / "small-local", options, workers=w, progress=False)
        dask, t_dask = timed(grade_batch_dask, work / "small", work / "small-dask", options, workers=w, progress=False)
        result["overhead"] = {"n": args.overhead_n, "workers": w, "local_pool_s": round(t_local, 1),
                              "dask_s": round(t_dask, 1), "ratio": round(t_dask / t_local, 3),
                              "same_results": essentials(local) == essentials(dask)}
        print(f"overhead, {args.overhead_n} submissions on {w} workers: local pool {t_local:.1f} s, Dask {t_dask:.1f} s "
              f"(ratio {t_dask / t_local:.2f}); same results: {result['overhead']['same_results']}", flush=True)
        save()

    # The paper estimate: one submission's cost in core-seconds, measured as the wall time of the run
    # with the most workers times this machine's cores (an upper bound: the machine was shared), spread
    # over every core of the cluster (one worker per two cores, each worker's kernel and grading process).
    cores = os.cpu_count() or 1
    cost = result["throughput"][str(best)]["wall_s"] * cores / args.n
    total_cores = args.cluster_machines * args.cluster_cores
    hours = 10_000 * cost / total_cores / 3600
    result["estimate"] = {"submissions": 10_000, "machines": args.cluster_machines, "cores_each": args.cluster_cores,
                          "dask_workers": total_cores // 2, "core_s_per_submission": round(cost, 2),
                          "hours": round(hours, 3), "one_core_hours": round(10_000 * cost / 3600, 1)}
    print(f"estimate: 10,000 submissions at {cost:.1f} core-s each on {args.cluster_machines} machines x "
          f"{args.cluster_cores} cores ({total_cores // 2} Dask workers): {60 * hours:.0f} min "
          f"(one core: {10_000 * cost / 3600:.1f} h)", flush=True)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
