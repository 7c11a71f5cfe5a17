"""Grade a folder on Dask distributed: a local cluster by default, or an existing one (``--scheduler``).

The work is the local grader's, moved: each Dask task grades one submission with the same grading
process (``python -m course_tools.grading _worker``) and the same Bubblewrap sandbox per kernel
(``isolation.py``) as ``batch.py``'s plain pool. A Dask worker never runs learner code itself: it
keeps one grading process (torch and the checks loaded once), a private copy of the course library
for it and a read-only kernel tree, all built from its own copy of the course at its first task.

- **Results identical to a local run.** A task carries the course's fingerprint (solutions, checks,
  grading code: ``batch.course_fingerprint``); a worker whose course differs refuses the task. The
  seed and limits travel with the task, so a submission's checks draw the same cases anywhere.
- **Submissions travel with their task.** The client reads each file once (never through a link) and
  sends its bytes. A worker that sees the same file at the same path (one machine, or a shared file
  system) grades it in place; another writes it into a private folder under the same relative name
  (a link is re-created as a link, so it is still refused, and an oversized file as a sparse one).
- **Reports come back as data.** Only the client writes reports, each once, atomically, stamped with
  the submission's SHA-256 and the batch's version (``batch.Journal``): a batch interrupted at any
  point (the grader killed, a Dask worker lost mid-submission: Dask reruns its task elsewhere)
  continues where it stopped when the same command is run again.
- **Nothing outlives a lost worker.** The grading process asks Linux to kill it when the Dask worker
  dies (``PR_SET_PDEATHSIG``), and its Bubblewrap dies with it (``--die-with-parent``).

Dask: https://distributed.dask.org (``LocalCluster``, ``Client.submit``, ``as_completed``).
"""

from __future__ import annotations

import atexit
import os
import queue
import secrets
import shutil
import sys
import tempfile
import threading
from pathlib import Path

from course_tools.grading import batch, isolation, notebooks
from course_tools.grading.options import Options

IN_FLIGHT_PER_WORKER = 2  # tasks queued per Dask worker: the client never holds a whole class in the scheduler


class CourseMismatch(RuntimeError):
    """A Dask worker's copy of the course grades differently from the client's."""


# ----------------------------------------------------------------------------------------------
# On the Dask worker
# ----------------------------------------------------------------------------------------------
class _Keeper:
    """One long-lived thread that starts the grading processes: ``PR_SET_PDEATHSIG`` fires when the
    *thread* that started a process exits, and Dask's task threads may come and go."""

    def __init__(self):
        self.jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._loop, daemon=True, name="course-grader-keeper").start()

    def _loop(self) -> None:
        while True:
            fn, answer = self.jobs.get()
            try:
                answer.put((True, fn()))
            except BaseException as err:  # handed back to the caller
                answer.put((False, err))

    def call(self, fn):
        answer: queue.Queue = queue.Queue(maxsize=1)
        self.jobs.put((fn, answer))
        ok, value = answer.get()
        if not ok:
            raise value
        return value


class _WorkerState:
    """What one Dask worker process keeps between tasks: its private folder, the library snapshot for
    its grading process, the kernel tree, and the grading process itself."""

    def __init__(self, options: Options, solutions: Path):
        if not options.trust_submissions:
            isolation.check_available()  # a worker without a sandbox refuses, and the task says why
        self.private = Path(tempfile.mkdtemp(prefix="course-dask-"))  # 0700: never a kernel's
        self.snapshot = self.private / f"lib-{secrets.token_hex(6)}"
        for package in ("course_lib", "course_tools"):
            shutil.copytree(notebooks.ROOT / package, self.snapshot / package,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        tree = isolation.build_kernel_tree(notebooks.ROOT, self.private / "kernel-tree", sys.executable)
        self.options = Options(**{**options.__dict__, "python": sys.executable, "kernel_tree": str(tree)})
        self.solutions = solutions
        self.keeper = _Keeper()
        self.worker: batch.Worker | None = None
        atexit.register(self.close)

    def grader(self) -> batch.Worker:
        if self.worker is None or not self.worker.alive():
            if self.worker is not None:
                self.worker.close()
            work = self.private / f"worker-{secrets.token_hex(3)}"
            self.worker = self.keeper.call(lambda: batch.Worker(self.options, self.snapshot, work, self.solutions,
                                                                die_with_parent=True))
        return self.worker

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None
        shutil.rmtree(self.private, ignore_errors=True)


_STATE: dict[tuple, _WorkerState] = {}
_LOCK = threading.Lock()


def _solutions_here(solutions: str) -> Path:
    """The client's solutions folder where this machine has it, else this course's own."""
    p = Path(solutions)
    return p if p.is_dir() else notebooks.SOLUTIONS


def _materialise(job: dict, private: Path) -> tuple[Path, Path | None]:
    """The file to grade on this machine: the client's path when it holds the same bytes (one machine,
    a shared file system), else a private copy under the same relative name. Returns (path, folder to
    remove afterwards)."""
    here = Path(job["path"])
    sha, _, problem = batch.submission_digest(here)
    if sha == job["sha256"] and (problem is None or here.is_symlink() == job["is_symlink"]):
        return here, None
    staged = private / f"staged-{secrets.token_hex(6)}"
    target = staged / job["rel"]
    target.parent.mkdir(parents=True)
    if job["data"] is not None:
        target.write_bytes(job["data"])
    elif job["is_symlink"]:
        os.symlink(job["link_target"] or "/nonexistent", target)
    elif job["size"] is not None:  # over the size limit: a sparse file of the same size is refused alike
        with open(target, "wb") as f:
            f.truncate(job["size"])
    return target, staged


def grade_job(job: dict, options: Options, fingerprint: str, solutions: str) -> dict:
    """The Dask task: grade one submission on this worker, exactly as the local pool does."""
    sols = _solutions_here(solutions)
    with _LOCK:  # one submission at a time per worker process (threads_per_worker=1 in any case)
        here = batch.course_fingerprint(sols)
        if here != fingerprint:
            raise CourseMismatch(f"this Dask worker's course (fingerprint {here[:12]}) differs from the grader's "
                                 f"({fingerprint[:12]}): run every worker from the same commit of the course")
        state_key = (fingerprint, tuple(sorted(options.__dict__.items())), str(sols))
        state = _STATE.get(state_key)
        if state is None:
            state = _STATE[state_key] = _WorkerState(options, sols)
        path, staged = _materialise(job, state.private)
        try:
            return state.grader().grade(path, job["key"])
        finally:
            if staged is not None:
                shutil.rmtree(staged, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# On the client
# ----------------------------------------------------------------------------------------------
def _job(sub: Path, key: str, rel: str, digest: tuple) -> dict:
    sha, raw, problem = digest
    link = os.readlink(sub) if sub.is_symlink() else None
    try:
        size = None if raw is not None else sub.lstat().st_size
    except OSError:
        size = None
    return {"path": str(sub), "key": key, "rel": rel, "sha256": sha, "data": raw, "problem": problem,
            "is_symlink": link is not None, "link_target": link, "size": size}


def start_cluster(workers: int, scheduler: str | None):
    """A client on ``scheduler``, or on a local cluster of ``workers`` processes of one thread each,
    on loopback with no dashboard. Returns (client, cluster or None)."""
    from distributed import Client, LocalCluster

    if scheduler:
        return Client(scheduler, timeout="30s"), None
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address=None, silence_logs=40)
    return Client(cluster), cluster


def grade_batch_dask(path: Path, out: Path, options: Options, workers: int = 2,
                     solutions: Path = notebooks.SOLUTIONS, progress: bool = True, scheduler: str | None = None,
                     report: bool = True, client=None) -> list[dict]:
    """Grade a folder on Dask; same reports as ``batch.grade_batch``. With ``scheduler`` (``tcp://host:8786``)
    the work goes to an existing cluster; else a local cluster of ``workers`` processes is started
    and closed. ``client``: an existing ``distributed.Client`` (tests)."""
    from distributed import as_completed

    if scheduler is None and client is None and not options.trust_submissions:
        isolation.check_available()
    path, out, root, subs, keys, digests, rows, journal, fingerprint, version = batch.plan_batch(
        path, out, options, solutions)
    todo = [s for s in subs if s not in rows]
    own = client is None
    cluster = None
    if own and todo:
        client, cluster = start_cluster(workers, scheduler)
    n_workers = len(client.scheduler_info(n_workers=-1)["workers"]) if client is not None and todo else workers
    status = batch.Progress(len(subs), len(rows), n_workers, stream=None if progress else open(os.devnull, "w"))
    if progress and rows:
        print(f"{len(rows)} submission(s) already graded in {out} by an earlier run of this batch; "
              f"grading the other {len(todo)}", file=sys.stderr, flush=True)

    graded_by: dict[str, Path] = {}  # task key -> the submission it grades

    def submit(sub: Path):
        job = _job(sub, keys[sub], str(sub.relative_to(root)), digests[sub])
        future = client.submit(grade_job, job, options, fingerprint, str(solutions), pure=False,
                               key=f"grade-{keys[sub][:80]}-{secrets.token_hex(4)}")
        graded_by[future.key] = sub
        return future

    try:
        if todo:
            pending = iter(todo)
            first = [submit(s) for _, s in zip(range(max(1, n_workers) * IN_FLIGHT_PER_WORKER + 2), pending)]
            tasks = as_completed(first)
            for future in tasks:
                sub = graded_by.pop(future.key)
                try:
                    row = future.result()
                except CourseMismatch:
                    raise
                except Exception as err:  # a task Dask gave up on (its workers kept dying): no report, next run retries
                    print(f"not graded: {sub.relative_to(root)}: {type(err).__name__}: {err}"[:400], file=sys.stderr,
                          flush=True)
                    status.update(None)
                else:
                    key = keys[sub]
                    if sub not in rows:  # each report once
                        batch.stamp(row, key, str(sub.relative_to(root)), digests[sub][0], version)
                        journal.record(key, row)
                        rows[sub] = row
                        if progress:
                            batch.print_row(row)
                        status.update(row["status"])
                future.release()
                nxt = next(pending, None)
                if nxt is not None:
                    tasks.add(submit(nxt))
    finally:
        if own and client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    return batch.finish_batch(subs, rows, out, status, n_workers, report=report, quiet=not progress)
