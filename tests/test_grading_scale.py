"""The grader at scale: a synthetic class, the batch's journal, the instructor's report, and Dask.

The Dask tests grade a few quick submissions of ``00_recap_exercises``: the plain local pool gives the
reference; a Dask batch whose worker is killed in the middle of a submission, and whose grader is then
killed too, must end, when run again, with the same reports, each written once; an external scheduler
and worker on loopback (``dask scheduler`` / ``dask worker``) must give the same reports again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from course_tools.grading import isolation
from course_tools.grading.batch import Journal, grade_batch, plan_batch
from course_tools.grading.options import Options
from course_tools.grading.report import feedback_markdown, item_analysis, write_report
from course_tools.grading.synthetic import MistakeRates, crash, make_class, wrong_constant

ROOT = Path(__file__).resolve().parents[1]
GRADE = [sys.executable, "-m", "course_tools.grading", "grade"]
QUICK = MistakeRates(timeout=0, kernel_exit=0, hostile=0)  # wrong answers, unfinished work and crashes only
LIMITS = ["--cell-timeout", "20", "--timeout", "150", "--seed", "5"]
OPTIONS = Options(cell_timeout=20, timeout=150, seed=5)


# ----------------------------------------------------------------------------------------------
# The synthetic class
# ----------------------------------------------------------------------------------------------
def test_the_synthetic_class_is_seeded_and_mostly_right(tmp_path):
    a = make_class(40, tmp_path / "a", seed=3, names=["00_recap_exercises"])
    b = make_class(40, tmp_path / "b", seed=3, names=["00_recap_exercises"])
    c = make_class(40, tmp_path / "c", seed=4, names=["00_recap_exercises"])
    assert a["submissions"] == b["submissions"] != c["submissions"]
    for name in a["submissions"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    kinds = [k for s in a["submissions"].values() for k in s["exercises"].values()]
    assert kinds.count("correct") > len(kinds) / 2  # most learners get most things right
    assert {"wrong_constant", "unfinished"} <= set(kinds)
    assert len(list((tmp_path / "a").glob("learner*_00_recap_exercises.ipynb"))) == 40


def test_the_mistakes_change_the_code_they_say(tmp_path):
    import random

    src = "def f(x):\n    ### BEGIN SOLUTION\n    return x * 2.5 + 1  # comment 7\n    ### END SOLUTION\n"
    changed = wrong_constant(src, random.Random(0))
    assert changed != src and "comment 7" in changed and "### BEGIN SOLUTION" in changed
    assert wrong_constant("x = 1\n", random.Random(0)) is None  # outside a solution region: untouched
    assert "[][0]" in crash(src).split("### BEGIN SOLUTION")[1].split("\n")[1]
    made = make_class(30, tmp_path, seed=1, names=["00_recap_exercises"],
                      rates=MistakeRates(wrong_constant=0, unfinished=1.0, crash=0, timeout=0, kernel_exit=0, hostile=0))
    nb = json.loads((tmp_path / "learner00001_00_recap_exercises.ipynb").read_text())
    assert set(made["submissions"]["learner00001_00_recap_exercises.ipynb"]["exercises"].values()) == {"unfinished"}
    assert sum("NotImplementedError" in "".join(c["source"]) for c in nb["cells"]) >= 3


def test_bad_class_requests_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="at least 1"):
        make_class(0, tmp_path)
    with pytest.raises(ValueError, match="choose from"):
        make_class(2, tmp_path, names=["no_such_notebook"])
    proc = subprocess.run(GRADE + ["--synthetic", "2", str(tmp_path / "x"), "--notebook", "nope"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "choose from" in proc.stderr


# ----------------------------------------------------------------------------------------------
# The instructor's report
# ----------------------------------------------------------------------------------------------
def _row(key: str, passes: list[bool], percent: float) -> dict:
    checks = [{"name": f"check {i}", "points": 1.0, "earned": float(p), "passed": p, "expected": "1",
               "got": "2 | 3" if not p else "", "hint": "look again", "seconds": 0.0, "warnings": []}
              for i, p in enumerate(passes)]
    score = float(sum(passes))
    return {"key": key, "submission": f"{key}.ipynb", "status": "graded", "score": score, "max_score": len(passes),
            "percent": percent, "integrity": [], "cell_errors": [], "events": [],
            "exercises": [{"exercise_id": "ex", "title": "An exercise", "status": "checked", "score": score,
                           "max_score": float(len(passes)), "passed": all(passes), "checks": checks}]}


def test_item_analysis_finds_the_hard_and_the_useless_checks(tmp_path):
    # totals rise with i (no ties); check 0: everyone passes; check 1: the upper half passes; check 2: the
    # three weakest pass and nobody else (a check that rewards the wrong thing)
    rows = [_row(f"s{i}", [True, i >= 5, i < 3], percent=10.0 * i) for i in range(10)]
    a = item_analysis(rows)["ex"]
    assert a["n"] == 10 and a["max_score"] == 3
    c0, c1, c2 = (a["checks"][f"check {i}"] for i in range(3))
    assert c0["pass_rate"] == 1.0 and c0["discrimination"] == 0.0
    assert c1["pass_rate"] == 0.5 and c1["discrimination"] == 1.0  # the 3 highest pass, the 3 lowest fail
    assert c2["pass_rate"] == 0.3 and c2["discrimination"] == -1.0
    write_report(rows, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "## The checks that fail most" in md and "| ex | check 2 | 30% | -1.00 |" in md
    for png in ("report_totals.png", "report_exercises.png", "report_checks.png"):
        assert (tmp_path / png).stat().st_size > 1000 and f"({png})" in md
    fb = (tmp_path / "feedback" / "s0.md").read_text()
    assert fb == feedback_markdown(rows[0]) and "2 \\| 3" in fb and "look again" in fb and "✘" in fb


# ----------------------------------------------------------------------------------------------
# The journal
# ----------------------------------------------------------------------------------------------
def test_the_journal_skips_only_the_same_file_graded_the_same_way(tmp_path):
    make_class(2, tmp_path / "class", seed=2, names=["00_recap_exercises"], rates=QUICK)
    out = tmp_path / "out"
    *_, subs, keys, digests, done, journal, fp, version = plan_batch(tmp_path / "class", out, OPTIONS,
                                                                        ROOT / "solutions")
    assert done == {} and Journal.seed_of(out) == OPTIONS.seed
    first = subs[0]
    row = {"status": "graded", "score": 1.0, "batch": {"sha256": digests[first][0], "version": version}}
    journal.record(keys[first], row)
    *_, done, _, _, _ = plan_batch(tmp_path / "class", out, OPTIONS, ROOT / "solutions")
    assert list(done) == [first]
    # another seed is another version: graded again
    *_, done, _, _, _ = plan_batch(tmp_path / "class", out, Options(cell_timeout=20, timeout=150, seed=6),
                                   ROOT / "solutions")
    assert done == {}
    # a changed submission is graded again
    first.write_bytes(first.read_bytes().replace(b"}", b"} ", 1))
    *_, done, _, _, _ = plan_batch(tmp_path / "class", out, OPTIONS, ROOT / "solutions")
    assert done == {}
    lines = (out / "journal.jsonl").read_text().splitlines()
    assert [json.loads(l)["key"] for l in lines] == [keys[first]]


# ----------------------------------------------------------------------------------------------
# Dask: identical results, an interruption, an external scheduler
# ----------------------------------------------------------------------------------------------
def essentials(rows) -> dict:
    """What must agree between runs, submission by submission: status, score, every check (no timings)."""
    return {r["key"]: (r["status"], r["score"], [(e["exercise_id"], e["status"], [(c["name"], c["earned"], c["passed"],
                                                                                 c["got"]) for c in e["checks"]])
                                                 for e in r["exercises"]]) for r in rows}


def _reports(out: Path) -> dict:
    skip = {"batch.json"}
    return essentials(json.loads(p.read_text()) for p in out.glob("*.json") if p.name not in skip)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    try:
        isolation.check_available()
    except isolation.SandboxUnavailable as err:
        if os.environ.get("COURSE_REQUIRE_SANDBOX"):
            raise
        pytest.skip(str(err))
    folder = tmp_path_factory.mktemp("class")
    made = make_class(5, folder, seed=11, names=["00_recap_exercises"], rates=QUICK)
    out = tmp_path_factory.mktemp("reference")
    rows = grade_batch(folder, out, OPTIONS, workers=2, progress=False, report=False)
    assert len(rows) == 5
    return {"folder": folder, "rows": essentials(rows), "made": made}


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.mark.slow
def test_a_batch_killed_twice_ends_as_an_uninterrupted_run(reference, tmp_path):
    out = tmp_path / "out"
    cmd = GRADE + [str(reference["folder"]), "--out", str(out), "--workers", "2", *LIMITS]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # 1. a Dask worker dies while its grading process runs a submission's kernel (bwrap is its child)
        deadline, victim, grader = time.monotonic() + 120, None, None
        while victim is None and time.monotonic() < deadline:
            for p in _descendants(proc.pid):
                try:
                    if "_worker" in p.cmdline() and any("bwrap" in c.name() for c in p.children()):
                        grader, victim = p, p.parent()
                        break
                except psutil.Error:
                    continue
            time.sleep(0.2)
        assert victim is not None, "no Dask worker was seen grading"
        os.kill(victim.pid, signal.SIGKILL)
        grader.wait(timeout=10)  # its grading process (and with it the sandbox) does not outlive it
        # 2. then the whole grader is killed, once a report or two are written
        journal = out / "journal.jsonl"
        while time.monotonic() < deadline and (not journal.exists() or len(journal.read_text().splitlines()) < 2):
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    partial = _reports(out)
    assert len(partial) >= 1  # every report present is whole (it parses)
    for key, row in partial.items():
        assert row == reference["rows"][key]
    # 3. the same command again (no --seed: the batch's own) finishes the batch
    again = subprocess.run(GRADE + [str(reference["folder"]), "--out", str(out), "--workers", "2",
                                    "--cell-timeout", "20", "--timeout", "150"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert "seed 5" in again.stdout and "continuing the batch" in again.stdout
    assert f"{len(partial)} submission(s) already graded" in again.stderr or not partial
    assert _reports(out) == reference["rows"]
    keys = [json.loads(line)["key"] for line in (out / "journal.jsonl").read_text().splitlines()]
    assert sorted(keys) == sorted(reference["rows"]) and len(set(keys)) == len(keys)  # each report once
    assert "submission(s) graded in" in again.stderr and (out / "report.md").exists()
    assert len(list((out / "feedback").glob("*.md"))) == 5


@pytest.mark.slow
def test_an_existing_dask_cluster_gives_the_same_reports(reference, tmp_path):
    dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    sched_file = tmp_path / "scheduler.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(dask + ["--host", "127.0.0.1", "--port", "0", "--no-dashboard", "--scheduler-file",
                                      str(sched_file)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)]
    try:
        deadline = time.monotonic() + 60
        while not sched_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        address = json.loads(sched_file.read_text())["address"]
        assert address.startswith("tcp://127.0.0.1:")
        procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
                                       "--nworkers", "1", "--no-dashboard", "--host", "127.0.0.1"], cwd=ROOT, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        out = tmp_path / "out"
        done = subprocess.run(GRADE + [str(reference["folder"]), "--out", str(out), "--scheduler", address, *LIMITS],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        assert f"the Dask cluster at {address}" in done.stdout
        assert _reports(out) == reference["rows"]
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)


@pytest.mark.slow
def test_the_scaling_benchmark_runs(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_grading_scale.py"), "--n", "1",
                           "--workers", "1", "--overhead-n", "0", "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "SandboxUnavailable" in proc.stderr and not os.environ.get("COURSE_REQUIRE_SANDBOX"):
        pytest.skip("no sandbox")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "grading_scale.json").read_text())
    assert result["throughput"]["1"]["per_minute"] > 0 and result["estimate"]["hours"] > 0
    assert (tmp_path / "report" / "report.md").exists()
