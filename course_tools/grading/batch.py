"""Grade one notebook or a folder of them: one process per submission, several in parallel.

Each submission runs in a kernel of its own inside an operating-system sandbox (``isolation.py``),
driven by a grading process (``python -m course_tools.grading _worker``, one per parallel slot). The
batch:

- refuses to start where no sandbox is available, unless ``--trust-submissions`` is given;
- copies, at the start, the course's library twice: the whole of ``course_lib`` and ``course_tools``
  for the grading processes, and the kernel tree (``course_lib`` without its checks, the weights, the
  agent) that the sandboxes mount read-only. Nothing a submission does reaches either copy;
- runs each grading process under its own memory limit, gives each submission the notebook's time
  limit plus a margin, then kills the grading process (and with it its sandbox) if it is still
  running and starts a fresh one: a hung submission costs one row marked ``timeout``, never the batch;
- turns a grading process that crashed into a row marked ``grader_error``, with its log;
- writes one JSON per submission, atomically, after the submission's kernel is gone, then
  ``grades.csv`` and ``grades.md``. Only this process writes reports; no sandbox can see them.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import queue
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from course_tools.grading import isolation, notebooks
from course_tools.grading.options import Options

WORKER_MARGIN_S = 90.0  # kernel start-up and restarts, on top of the notebook's own limit


def find_submissions(path: Path, exclude: Path | None = None) -> list[Path]:
    """The notebooks under ``path`` (``.ipynb_checkpoints`` and ``exclude`` skipped). Folders that are
    symbolic links are not entered; files that are symbolic links are listed, and graded as such
    (not followed, flagged)."""
    if path.is_file() or path.is_symlink():
        return [path]
    found = []
    for folder, dirs, files in os.walk(path, followlinks=False):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if d != ".ipynb_checkpoints" and (exclude is None or here / d != exclude))
        found += [here / f for f in sorted(files) if f.endswith(".ipynb")]
    return found


def submission_key(path: Path, root: Path) -> str:
    """A stable, file-name-safe name for a submission: its path under the folder graded."""
    rel = path.relative_to(root) if root.is_dir() else Path(path.name)
    return "__".join(rel.with_suffix("").parts)


def submission_keys(paths: list[Path], root: Path) -> dict[Path, str]:
    """`submission_key` of each path; where two would share a report (``a__b.ipynb`` and
    ``a/b.ipynb``), both get a short hash of their path, so that no submission can take another's."""
    keys = {p: submission_key(p, root) for p in paths}
    counts: dict[str, int] = {}
    for k in keys.values():
        counts[k.lower()] = counts.get(k.lower(), 0) + 1
    return {p: k if counts[k.lower()] == 1 else f"{k}__{hashlib.sha256(str(p).encode()).hexdigest()[:8]}"
            for p, k in keys.items()}


def write_atomically(path: Path, text: str) -> None:
    """Write a report so that it is either the old file or the whole new one, never half of it."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "w", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# The batch's journal: nothing lost, nothing twice
# ----------------------------------------------------------------------------------------------
FINGERPRINTED = ("course_lib/checks", "course_tools/checking.py", "course_tools/agent.py",
                 "course_tools/grading/executor.py", "course_tools/grading/notebooks.py")
RESULT_OPTIONS = ("seed", "timeout", "cell_timeout", "memory_mb", "file_mb", "trust_submissions")


def course_fingerprint(solutions: Path = notebooks.SOLUTIONS, root: Path = notebooks.ROOT) -> str:
    """SHA-256 of what decides a grade besides the submission: the solution notebooks, the checks and
    the grading code. Two machines grade alike exactly when their fingerprints agree."""
    h = hashlib.sha256()
    files = sorted(Path(solutions).glob("*.ipynb"))
    for rel in FINGERPRINTED:
        p = root / rel
        files += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    for f in files:
        h.update(f.name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def batch_version(fingerprint: str, options: Options) -> str:
    """The version a report is stamped with: the course's fingerprint and the options that change a
    result (seed, limits, sandbox). A report of another version is graded again."""
    chosen = {k: getattr(options, k) for k in RESULT_OPTIONS}
    return hashlib.sha256((fingerprint + json.dumps(chosen, sort_keys=True)).encode()).hexdigest()[:16]


def submission_digest(path: Path) -> tuple[str, bytes | None, str | None]:
    """(SHA-256, bytes, problem) of a submission as the grader reads it (never through a link)."""
    from course_tools.grading.executor import read_submission

    raw, problem = read_submission(path)
    return hashlib.sha256(raw if raw is not None else f"unreadable: {problem}".encode()).hexdigest(), raw, problem


class Journal:
    """The output folder as the batch's journal. A submission is done when ``OUT/<key>.json`` exists,
    parses and carries this batch's stamp (``batch``: the submission's SHA-256 and the version of the
    course and options); every report is written once, atomically, so a present one is whole.
    ``journal.jsonl`` records each report as it is written (append-only; the reports decide).
    ``batch.json`` keeps the seed, so that running the same command again continues the batch."""

    def __init__(self, out: Path):
        self.out = out
        self.log = out / "journal.jsonl"

    def done(self, key: str, sha: str, version: str) -> dict | None:
        try:
            row = json.loads((self.out / f"{key}.json").read_text())
        except (OSError, ValueError):
            return None
        stamp = row.get("batch") if isinstance(row, dict) else None
        return row if stamp == {"sha256": sha, "version": version} else None

    def record(self, key: str, row: dict) -> None:
        write_atomically(self.out / f"{key}.json", json.dumps(row, indent=1) + "\n")
        with open(self.log, "a") as f:
            f.write(json.dumps({"key": key, "status": row["status"], "score": row["score"],
                                "version": row["batch"]["version"], "time": round(time.time(), 1)}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    @staticmethod
    def seed_of(out: Path) -> int | None:
        """The seed of an earlier batch in ``out`` (to continue it), or None."""
        try:
            return int(json.loads((out / "batch.json").read_text())["seed"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def start(self, options: Options, fingerprint: str, version: str) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        write_atomically(self.out / "batch.json", json.dumps(
            {"seed": options.seed, "version": version, "course_fingerprint": fingerprint,
             "options": {k: getattr(options, k) for k in RESULT_OPTIONS}}, indent=1) + "\n")


class Progress:
    """Progress on stderr while a batch runs (done, failed, rate, time left), and its summary."""

    def __init__(self, total: int, resumed: int, workers: int, stream=None, every_s: float = 5.0):
        self.total, self.resumed, self.workers = total, resumed, workers
        self.stream = stream if stream is not None else sys.stderr
        self.every_s, self.start, self.last = every_s, time.monotonic(), 0.0
        self.statuses: dict[str, int] = {}
        self.lost = 0  # submissions that got no report this run (a Dask task that could not finish)

    @property
    def done(self) -> int:
        return sum(self.statuses.values())

    @property
    def failed(self) -> int:
        return sum(n for s, n in self.statuses.items() if s != "graded") + self.lost

    def rate_per_min(self) -> float:
        return 60 * self.done / max(time.monotonic() - self.start, 1e-9)

    def line(self) -> str:
        left = self.total - self.resumed - self.done - self.lost
        rate = self.rate_per_min()
        eta = f"{left / rate:.1f} min left" if rate > 0 else "time left unknown"
        return (f"[{self.resumed + self.done + self.lost}/{self.total}] {self.done} graded this run "
                f"({self.failed} failed or not graded), {self.resumed} done before; {rate:.1f}/min, {eta}")

    def update(self, status: str | None) -> None:
        if status is None:
            self.lost += 1
        else:
            self.statuses[status] = self.statuses.get(status, 0) + 1
        now = time.monotonic()
        if now - self.last >= self.every_s or self.resumed + self.done + self.lost == self.total:
            self.last = now
            print(self.line(), file=self.stream, flush=True)

    def summary(self, rows: list[dict]) -> str:
        wall = time.monotonic() - self.start
        kinds = ", ".join(f"{s} {n}" for s, n in sorted(self.statuses.items()))
        mean = sum(r.get("percent", 0.0) for r in rows) / max(len(rows), 1)
        text = (f"{self.done} submission(s) graded in {wall:.1f} s with {self.workers} worker(s) "
                f"({self.rate_per_min():.1f}/min; {kinds or 'none'}); {self.resumed} done by an earlier run")
        if self.lost:
            text += f"; {self.lost} not graded (run the same command again to finish them)"
        return text + f". {len(rows)} reports, mean score {mean:.1f}%."


def plan_batch(path: Path, out: Path, options: Options, solutions: Path):
    """What a batch (local or on Dask) grades: the submissions, their keys, their digests, and the rows
    an earlier run of the same batch already wrote."""
    path, out = path.absolute(), out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    subs = find_submissions(path, exclude=out)
    root = path if path.is_dir() else path.parent
    keys = submission_keys(subs, root)
    fingerprint = course_fingerprint(solutions)
    version = batch_version(fingerprint, options)
    journal = Journal(out)
    journal.start(options, fingerprint, version)
    digests, done = {}, {}
    for sub in subs:
        digests[sub] = submission_digest(sub)
        row = journal.done(keys[sub], digests[sub][0], version)
        if row is not None:
            done[sub] = row
    return path, out, root, subs, keys, digests, done, journal, fingerprint, version


def stamp(row: dict, key: str, rel: str, sha: str, version: str) -> dict:
    row["key"], row["submission"] = key, rel
    row["batch"] = {"sha256": sha, "version": version}
    return row


def finish_batch(subs: list[Path], rows: dict, out: Path, progress: Progress, workers: int,
                 report: bool = True, quiet: bool = False) -> list[dict]:
    """Tables, the instructor's report and the feedback files over every report of the batch."""
    ordered = [rows[s] for s in subs if s in rows]
    write_tables(ordered, out, wall_seconds=time.monotonic() - progress.start, workers=workers)
    if report:
        from course_tools.grading.report import write_report

        write_report(ordered, out)
    if not quiet:
        print(progress.summary(ordered), file=progress.stream, flush=True)
    return ordered


def grade_batch(path: Path, out: Path, options: Options, workers: int = 2, solutions: Path = notebooks.SOLUTIONS,
                progress: bool = True, report: bool = True) -> list[dict]:
    """The plain local pool: ``workers`` threads, each driving one grading process. ``course.py grade``
    runs the same work on Dask (``distributed.py``) unless ``--local-pool`` is given."""
    if not options.trust_submissions:
        isolation.check_available()  # raises SandboxUnavailable with the instructor's options
    path, out, root, subs, keys, digests, rows, journal, _, version = plan_batch(path, out, options, solutions)
    status = Progress(len(subs), len(rows), workers, stream=None if progress else open(os.devnull, "w"))
    private = Path(tempfile.mkdtemp(prefix="course-batch-"))  # 0700: the grader's, never a kernel's
    snapshot = private / f"lib-{secrets.token_hex(6)}"
    for package in ("course_lib", "course_tools"):
        shutil.copytree(notebooks.ROOT / package, snapshot / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    tree = isolation.build_kernel_tree(notebooks.ROOT, private / "kernel-tree", options.python)
    options = Options(**{**options.__dict__, "kernel_tree": str(tree)})
    todo: queue.Queue = queue.Queue()
    for sub in subs:
        if sub not in rows:
            todo.put(sub)
    lock = threading.Lock()

    def slot(n: int) -> None:
        worker = None
        try:
            while True:
                try:
                    sub = todo.get_nowait()
                except queue.Empty:
                    return
                key = keys[sub]
                if worker is None:
                    worker = Worker(options, snapshot, private / f"worker-{n}-{secrets.token_hex(3)}", solutions)
                row = worker.grade(sub, key)
                if not worker.alive():
                    worker = None
                stamp(row, key, str(sub.relative_to(root)), digests[sub][0], version)
                with lock:
                    journal.record(key, row)
                    rows[sub] = row
                    if progress:
                        print_row(row)
                    status.update(row["status"])
        finally:
            if worker is not None:
                worker.close()

    try:
        threads = [threading.Thread(target=slot, args=(n,), daemon=True) for n in range(max(1, workers))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        shutil.rmtree(private, ignore_errors=True)
    return finish_batch(subs, rows, out, status, workers, report=report, quiet=not progress)


def print_row(row: dict) -> None:
    print(f"{row['status']:>14}  {row['score']:>6g}/{row['max_score']:<6g} {row['seconds']:>6.1f} s  "
          f"{row['submission']}", flush=True)


class Worker:
    """A grading process that grades submissions one after another (each in a fresh kernel), so that
    the grader's own start-up (torch, the checks) is paid once per worker, not per submission.

    Protocol: one JSON line per submission on its stdin; it answers "done" on stdout when the result
    file is written. A worker that runs past a notebook's limit is killed with its kernel, and the
    next submission gets a fresh worker."""

    def __init__(self, options: Options, snapshot: Path, work: Path, solutions: Path, die_with_parent: bool = False):
        self.options, self.work, self.solutions = options, work, solutions
        work.mkdir(parents=True)
        env = {**os.environ, "PYTHONPATH": str(snapshot), "PYTHONDONTWRITEBYTECODE": "1",
               "COURSE_ROOT": str(notebooks.ROOT)}
        cmd = [options.python, "-m", "course_tools.grading", "_worker", "--solutions", str(solutions),
               "--seed", str(options.seed), "--timeout", str(options.timeout), "--cell-timeout",
               str(options.cell_timeout), "--memory-mb", str(options.memory_mb), "--file-mb", str(options.file_mb),
               "--grader-memory-mb", str(options.grader_memory_mb), "--kernel-tree", str(options.kernel_tree)]
        if options.trust_submissions:
            cmd.append("--trust-submissions")
        if die_with_parent:  # Linux: SIGKILL when the process that started it dies (a lost Dask worker)
            cmd += ["--parent-pid", str(os.getpid())]
        self.log = open(work / "worker.log", "ab")
        self.proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, start_new_session=True)
        self.buffer = b""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def grade(self, sub: Path, key: str) -> dict:
        """Grade one submission; never raises."""
        start = time.monotonic()
        result_file = self.work / f"{secrets.token_hex(6)}.json"
        limit = self.options.timeout + WORKER_MARGIN_S
        answer = None
        try:
            self.proc.stdin.write((json.dumps({"submission": str(sub), "result": str(result_file)}) + "\n").encode())
            self.proc.stdin.flush()
            answer = self._read_line(start + limit)
        except (BrokenPipeError, OSError):
            pass
        if answer == "done" and result_file.exists():
            try:
                return json.loads(result_file.read_text())
            except ValueError:
                pass
        timed_out = answer is None and self.alive()
        self.kill()
        tail = (self.work / "worker.log").read_bytes()[-1500:].decode("utf-8", "replace")
        status = "timeout" if timed_out else "grader_error"
        detail = (f"grading ran past {limit:g} s and was stopped" if timed_out
                  else f"the grading process failed (exit code {self.proc.returncode}): {tail}")
        source = notebooks.source_for(sub, None, self.solutions)
        return {"submission": str(sub), "source": source.name if source else None, "status": status, "score": 0.0,
                "max_score": _max_score(sub, self.solutions),
                "percent": 0.0, "exercises": [], "integrity": [], "flagged": False, "cell_errors": [],
                "events": [{"kind": status, "detail": detail}], "seconds": round(time.monotonic() - start, 2),
                "grader": {"seed": self.options.seed}}

    def _read_line(self, deadline: float) -> str | None:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:  # the worker exited
                    return "eof"
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode("utf-8", "replace").strip()

    def kill(self) -> None:
        _kill_group(self.proc.pid)  # the grading process and its bwrap; each sandbox dies with its bwrap
        self.proc.wait()

    def close(self) -> None:
        if self.alive():
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()
        self.log.close()


def _max_score(sub: Path, solutions: Path) -> float:
    try:
        import nbformat

        from course_lib.checks import EXERCISES

        source = notebooks.source_for(sub, None, solutions)
        nb = nbformat.read(source, as_version=4)
        return sum(EXERCISES[notebooks.exercise_of(c)].max_score for c in nb.cells if notebooks.is_checker(c))
    except Exception:
        return 0.0


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------
def _exercise_ids(rows: list[dict]) -> list[str]:
    ids: list[str] = []
    for row in rows:
        for ex in row.get("exercises", []):
            if ex["exercise_id"] not in ids:
                ids.append(ex["exercise_id"])
    return ids


def _flags(row: dict) -> str:
    kinds = sorted({i["kind"] for i in row.get("integrity", []) if i["kind"] != "suspicious_code"})
    return ", ".join(kinds)


def write_tables(rows: list[dict], out: Path, wall_seconds: float, workers: int) -> None:
    ids = _exercise_ids(rows)
    fields = ["submission", "status", "score", "max_score", "percent", *ids, "flags", "cell_errors", "seconds"]
    with open(out / "grades.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for row in rows:
            scores = {e["exercise_id"]: e["score"] for e in row.get("exercises", [])}
            w.writerow({"submission": row["submission"], "status": row["status"], "score": row["score"],
                        "max_score": row["max_score"], "percent": row.get("percent", 0.0),
                        **{i: scores.get(i, "") for i in ids}, "flags": _flags(row),
                        "cell_errors": len(row.get("cell_errors", [])), "seconds": row.get("seconds", "")})
    lines: list[str] = []
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row.get("source") or "(no matching notebook)", []).append(row)
    for source, group in groups.items():  # one table per notebook: its own exercise columns
        cols = _exercise_ids(group)
        if len(groups) > 1:
            lines += [f"### {source}", ""]
        lines += ["| submission | status | score | " + " | ".join(cols) + " | flags | seconds |",
                  "| --- | --- | ---: | " + " | ".join("---:" for _ in cols) + " | --- | ---: |"]
        for row in group:
            scores = {e["exercise_id"]: e for e in row.get("exercises", [])}
            cells = [f"{scores[i]['score']:g}/{scores[i]['max_score']:g}" if i in scores else "" for i in cols]
            lines.append(f"| {row['submission']} | {row['status']} | {row['score']:g}/{row['max_score']:g} | "
                         + " | ".join(cells) + f" | {_flags(row) or '-'} | {row.get('seconds', 0):.1f} |")
        lines.append("")
    per = [r.get("seconds", 0.0) for r in rows]
    lines += [f"{len(rows)} submissions graded in {wall_seconds:.1f} s with {workers} workers; "
                  f"per submission {min(per, default=0):.1f} to {max(per, default=0):.1f} s "
                  f"(mean {sum(per) / max(len(per), 1):.1f} s)."]
    (out / "grades.md").write_text("\n".join(lines) + "\n")


def worker_main(args) -> int:
    """The ``_worker`` command: grade the submissions named on stdin, one JSON line each."""
    import resource  # POSIX only, like the rest of the grading process

    if args.parent_pid:
        _die_with_parent(args.parent_pid)

    limit = args.grader_memory_mb * 2**20
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    if limit > 0:  # the grading process's own memory limit: a forged reply cannot take the machine
        resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    from course_lib.checks import EXERCISES  # noqa: F401  (the checks, loaded once, before any submission)
    from course_tools.grading.executor import grade_submission, read_submission

    options = Options(timeout=args.timeout, cell_timeout=args.cell_timeout, memory_mb=args.memory_mb,
                      file_mb=args.file_mb, grader_memory_mb=args.grader_memory_mb, seed=args.seed,
                      python=sys.executable, trust_submissions=args.trust_submissions, kernel_tree=args.kernel_tree)
    for line in sys.stdin:
        job = json.loads(line)
        sub = Path(job["submission"])
        raw, _ = read_submission(sub)
        try:
            nb = notebooks.parse_submission(raw.decode("utf-8")) if raw is not None else None
        except Exception:
            nb = None
        result = grade_submission(sub, notebooks.source_for(sub, nb, Path(args.solutions)), options)
        write_atomically(Path(job["result"]), json.dumps(result))
        print("done", flush=True)
    return 0


def _die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this process when the thread that started it exits (``PR_SET_PDEATHSIG``);
    its Bubblewrap runs with ``--die-with-parent``, so the sandbox goes too. Exits at once if the parent
    is already gone."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(1)
