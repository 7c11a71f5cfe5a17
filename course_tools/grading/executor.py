"""Grade one submission: run its cells in a sandboxed kernel, and the checks from this process.

The order of events for one notebook:

1. Read the submission (never written, never through a symbolic link), find its source in
   solutions/, and make the grader's copy with the source's check cells put back by cell id
   (``notebooks.restore_checker_cells``).
2. Start a kernel in its operating-system sandbox (``isolation.py`` outside, ``sandbox.py`` inside),
   driven over pipes this process created.
3. Run the cells in order. A learner cell runs in the kernel with a time limit; its errors are
   recorded and the run goes on. At each check cell, the grader runs that exercise's checks here,
   in its own process, against the kernel's state at that point (so a name reused later in the
   notebook does not change what was graded). The checks reach the learner's objects only through
   `RemoteAgent`, which sends requests over the pipe and gets back data, size-capped and rebuilt
   (``course_tools.agent.loads``) before any check looks at it.
4. If a cell or a check times out, dies, runs out of memory or breaks the protocol, the kernel is
   replaced: the same sandbox from the same read-only kernel tree, fresh scratch folders; it
   replays the cells that had run without error, skips the culprit, and the run goes on. The
   submission's status records the first such event; the notebook's own time limit still holds.
5. The kernel is ended with everything it started; what the grader saw from outside (processes left
   running, protocol violations, resource use) and the refusals its hook reported become flags.

The result is a plain dict (see `grade_submission`), written as JSON by ``batch.py``.
"""
from __future__ import annotations

import errno
import json
import os
import select
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from course_tools.agent import MAX_WIRE_BYTES, dumps, loads, to_wire
from course_tools.checking import ExerciseResult, KernelLost
from course_tools.colab_setup import is_setup_cell
from course_tools.grading import isolation, notebooks, sandbox
from course_tools.grading.options import Options

MAX_SUBMISSION_BYTES = 256 * 2**20  # a larger file is not read (status invalid)
OOM_MARKERS = ("MemoryError", "can't allocate memory", "not enough memory", "std::bad_alloc", "Cannot allocate memory")
SUSPICIOUS = {  # source patterns reported to the instructor (never scored): ways around a sandbox
    "_course_agent": "talks to the grader's agent", "addaudithook": "adds an audit hook",
    "__code__": "replaces code objects", "ctypes": "uses ctypes", "gc.get_objects": "walks the garbage collector",
    "/proc/": "reads /proc", "solutions/": "names the solutions folder", "course_lib.checks": "imports the checks",
    "os._exit": "exits the process", "sys.modules": "edits sys.modules",
    "course_tools.agent": "imports the grader's agent (its probes answer the checks)",
    # A probe's methods run in the learner's process: replacing them (through the object's class) makes them lie.
    "ProbeVelocity": "names a grader's probe class", ").gradient =": "replaces a probe's gradient method",
    ".gradient=": "replaces a probe's gradient method", "__class__": "reaches an object's class",
    "setattr(type(": "replaces a method of an object's class",
}


# ----------------------------------------------------------------------------------------------
# The kernel
# ----------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    kind: str  # ok | error | timeout | killed | died
    ename: str = ""
    evalue: str = ""
    seconds: float = 0.0

    @property
    def out_of_memory(self) -> bool:
        return any(m in f"{self.ename} {self.evalue}" for m in OOM_MARKERS)


class ProtocolError(Exception):
    """The kernel wrote something on its reply pipe that is not the awaited reply."""


class _Drain(threading.Thread):
    """Reads a pipe from the kernel until it closes: counts every byte, and keeps either the last
    ``keep`` bytes (stdout and stderr) or, for the hook's reports (``lines``), the first ``lines``
    distinct lines and the kinds of all of them: however many lines come first, a later kind of
    refusal is never lost. Never holds more than that."""

    def __init__(self, fd: int, keep: int = 0, lines: int = 0):
        super().__init__(daemon=True)
        self.fd, self.keep, self.max_lines = fd, keep, lines
        self.count, self.tail, self.lines, self.partial = 0, b"", [], b""
        self.kinds: dict[str, int] = {}  # kind of report (its text before a tab, cut short) -> lines seen
        self.closed = threading.Event()

    def run(self) -> None:
        try:
            while True:
                chunk = os.read(self.fd, 1 << 16)
                if not chunk:
                    break
                self.count += len(chunk)
                if self.keep:
                    self.tail = (self.tail + chunk)[-self.keep:]
                if self.max_lines:
                    self.partial += chunk
                    *done, self.partial = self.partial.split(b"\n")
                    self.partial = self.partial[-4000:]
                    for raw in done:
                        line = raw.decode("utf-8", "replace")[:2000]
                        kind = line.partition("\t")[0][:40]
                        if kind in self.kinds or len(self.kinds) < 64:
                            self.kinds[kind] = self.kinds.get(kind, 0) + 1
                        if len(self.lines) < self.max_lines and line not in self.lines:
                            self.lines.append(line)
        except OSError:
            pass
        finally:
            os.close(self.fd)
            self.closed.set()


@dataclass
class Kernel:
    """One sandboxed kernel (``isolation.py``), driven over pipes. ``start`` again after a crash
    builds the same sandbox from the same read-only kernel tree: nothing of the last one survives."""

    options: Options
    tree: Path | None = None  # the kernel tree (isolation.build_kernel_tree); None: one is built here
    proc: subprocess.Popen | None = None
    starts: int = 0
    output_bytes: int = 0
    seq: int = 0
    events: list = field(default_factory=list)  # what the grader saw from outside the sandbox
    hook_lines: list = field(default_factory=list)  # the refusals the kernel's hook reported, as read
    hook_kinds: dict = field(default_factory=dict)  # how many of each kind, all of them
    max_rss_mb: int = 0  # the largest resident size of a process of the kernel (from wait4)
    cpu_s: float = 0.0  # CPU seconds of all its kernels
    last_code: int | None = None  # exit code of the last kernel
    stopped_by_grader: bool = False  # the last kernel was alive when the grader ended it

    def start(self) -> None:
        self.starts += 1
        self.seq = 0
        requests_r, self.requests = os.pipe()
        self.replies, replies_w = os.pipe()
        events_r, events_w = os.pipe()
        out_r, out_w = os.pipe()
        info_r, info_w = os.pipe()
        tree = self.tree
        env = {"HOME": isolation.SCRATCH, "TMPDIR": "/tmp", "MPLCONFIGDIR": "/tmp/mpl", "MPLBACKEND": "Agg",
               "IPYTHONDIR": "/tmp/ipython", "COURSE_PROGRESS": "0", "PYTHONDONTWRITEBYTECODE": "1",
               "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PATH": "/usr/local/bin:/usr/bin:/bin",
               "USER": "learner", "LOGNAME": "learner", "PYTHONPATH": isolation.COURSE,
               sandbox.ENV_FDS: f"{requests_r},{replies_w},{events_w}",
               sandbox.ENV_MPL_CACHE: f"{isolation.COURSE}/mpl",
               sandbox.ENV_WRITABLE: os.pathsep.join([isolation.SCRATCH, "/tmp"]),
               sandbox.ENV_PROTECT: str(notebooks.ROOT),
               sandbox.ENV_DENY: os.pathsep.join(self.deny_list(isolation.COURSE) + self.deny_list(str(notebooks.ROOT)))}
        limits = isolation.Limits(memory_mb=self.options.memory_mb, file_mb=self.options.file_mb,
                                  cpu_s=int(self.options.timeout + 60))
        if self.options.trust_submissions:  # no sandbox: the same runner, its own limits, a temporary folder
            self.scratch = Path(tempfile.mkdtemp(prefix="course-grade-"))
            env.update({"HOME": str(self.scratch), "TMPDIR": str(self.scratch), "PYTHONPATH": str(tree),
                        "MPLCONFIGDIR": str(self.scratch / ".mpl"), "IPYTHONDIR": str(self.scratch / ".ipython"),
                        sandbox.ENV_MPL_CACHE: str(tree / "mpl"), sandbox.ENV_WRITABLE: str(self.scratch),
                        sandbox.ENV_DENY: os.pathsep.join(self.deny_list(str(tree)) + self.deny_list(str(notebooks.ROOT))),
                        sandbox.ENV_MEMORY_MB: str(limits.memory_mb), sandbox.ENV_FILE_MB: str(limits.file_mb)})
            argv = [self.options.python, "-s", str(tree / isolation.ENTRY_POINT)]
            cwd = self.scratch
        else:
            self.scratch = None
            argv = isolation.command(tree, self.options.python, info_w, limits, env)
            cwd = None
        try:
            self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out_w, stderr=out_w,
                                         pass_fds=(requests_r, replies_w, events_w, info_w),
                                         start_new_session=self.options.trust_submissions)
        finally:
            for fd in (requests_r, replies_w, events_w, out_w, info_w):
                os.close(fd)
        self.out = _Drain(out_r, keep=4000)
        self.hook = _Drain(events_r, lines=200)
        self.out.start()
        self.hook.start()
        if self.options.trust_submissions:
            os.close(info_r)
            self.info = {"child-pid": self.proc.pid}
        else:
            self.info = isolation.read_info(info_r, 60)
            os.close(info_r)
        try:
            kind, _, _ = self._read_frame(time.monotonic() + 120, 64)
        except (ProtocolError, TimeoutError) as err:
            self.kill()
            raise RuntimeError(f"the sandboxed kernel did not start ({err}): {self.log_tail()}") from None
        if kind != b"H":
            self.kill()
            raise RuntimeError("the sandboxed kernel did not start: it said something else than hello")

    @staticmethod
    def deny_list(root: str) -> list[str]:
        """Names whose reading the kernel's hook refuses and reports. In the sandbox they do not
        exist at all; the hook only makes the attempt visible."""
        return [f"{root}/{name}" for name in ("solutions", "course_lib/checks", "tests", ".git",
                                                 "course_tools/checking.py")]

    def alive(self, grace: float = 0.0) -> bool:
        """Whether the kernel runs; with ``grace``, whether it still runs after up to that many seconds."""
        if self.proc is None:
            return False
        try:
            self.proc.wait(grace) if grace else None
        except subprocess.TimeoutExpired:
            pass
        return self.proc.poll() is None

    # -- frames ------------------------------------------------------------------------------
    def _send(self, kind: bytes, payload: bytes) -> int:
        self.seq += 1
        data = kind + self.seq.to_bytes(8, "big") + len(payload).to_bytes(8, "big") + payload
        view = memoryview(data)
        deadline = time.monotonic() + 30
        while view:
            _, ready, _ = select.select([], [self.requests], [], 0.2)
            if ready:
                view = view[os.write(self.requests, view[: 1 << 16]):]
            elif not self.alive() or time.monotonic() > deadline:
                raise BrokenPipeError("the kernel does not read its requests")
        return self.seq

    def _read_exact(self, n: int, deadline: float) -> bytes:
        chunks, left = [], n
        while left:
            ready, _, _ = select.select([self.replies], [], [], 0.05)
            if ready:
                chunk = os.read(self.replies, min(left, 1 << 20))
                if not chunk:
                    raise ProtocolError("the kernel closed its reply pipe")
                chunks.append(chunk)
                left -= len(chunk)
            elif not self.alive():
                raise ProtocolError("the kernel is gone")
            elif time.monotonic() > deadline:
                raise TimeoutError()
        return b"".join(chunks)

    def _read_frame(self, deadline: float, limit: int) -> tuple[bytes, int, bytes]:
        """One frame, its size checked against ``limit`` before anything of it is read."""
        head = self._read_exact(17, deadline)
        kind, seq, size = head[:1], int.from_bytes(head[1:9], "big"), int.from_bytes(head[9:], "big")
        if size > limit:
            raise ProtocolError(f"a reply of {size} bytes, larger than the limit of {limit}")
        return kind, seq, self._read_exact(size, deadline)

    def _await(self, seq: int, kinds: tuple[bytes, ...], timeout: float, limit: int) -> tuple[str, bytes]:
        """Wait for the reply to request ``seq``: ('ok', payload), ('timeout', b''), ('killed', b''),
        ('died', b''). A stray frame (wrong number or kind) is a protocol error: the kernel is killed."""
        deadline = time.monotonic() + timeout
        interrupted = False
        while True:
            try:
                kind, got, payload = self._read_frame(deadline, limit)
            except TimeoutError:
                if interrupted:
                    self.kill()
                    return "killed", b""
                self.interrupt()
                interrupted, deadline = True, time.monotonic() + 3.0  # a grace period to come back
                continue
            except ProtocolError as err:
                if self.alive(grace=1.0):  # a kernel that exits closes its pipes a moment before it is gone
                    self.events.append({"kind": "protocol_violation", "detail": str(err)[:300]})
                    self.kill()
                return "died", b""
            if got != seq or kind not in kinds:
                if kind == b"R" and got == seq and interrupted:  # the interrupt landed while answering
                    return "timeout", b""
                self.events.append({"kind": "protocol_violation",
                                    "detail": f"an unexpected frame {kind!r} #{got} while waiting for #{seq}"})
                self.kill()
                return "died", b""
            return ("timeout" if interrupted else "ok"), payload

    # -- cells and requests --------------------------------------------------------------------
    def execute(self, code: str, timeout: float) -> Outcome:
        """Run one cell; its output goes to the drained pipe (counted, then dropped)."""
        start = time.monotonic()
        try:
            seq = self._send(b"E", code.encode("utf-8", "replace"))
        except OSError:
            return Outcome("died", "KernelDied", self.death_reason(), time.monotonic() - start)
        status, payload = self._await(seq, (b"R",), timeout, 1 << 16)
        took = time.monotonic() - start
        if status == "killed":
            return Outcome("killed", "Timeout", f"stopped after {timeout:g} s (did not answer an interrupt)", took)
        if status == "died":
            return Outcome("died", "KernelDied", self.death_reason(), took)
        if status == "timeout":
            return Outcome("timeout", "Timeout", f"stopped after {timeout:g} s", took)
        try:
            reply = json.loads(payload)
            ok = reply["status"] == "ok"
            ename, evalue = str(reply.get("ename", "Error"))[:200], str(reply.get("evalue", ""))[:500]
        except (ValueError, KeyError, TypeError, AttributeError):
            return Outcome("error", "ProtocolError", "the kernel's reply was not a reply", took)
        return Outcome("ok", seconds=took) if ok else Outcome("error", ename, evalue, took)

    def request(self, payload: bytes, timeout: float) -> tuple[str, bytes]:
        try:
            seq = self._send(b"A", payload)
        except OSError:
            return "died", b""
        return self._await(seq, (b"A",), timeout, MAX_WIRE_BYTES)

    def interrupt(self) -> None:
        pid = self.info.get("child-pid") if getattr(self, "info", None) else None
        if self.alive() and pid:
            try:
                os.kill(pid, signal.SIGINT)
            except (ProcessLookupError, PermissionError):
                pass

    def kill(self) -> None:
        """End the kernel and everything it started; record what was left running."""
        if self.proc is None:
            return
        if self.hook.closed.is_set() and self.alive(grace=1.0):
            self.events.append({"kind": "evidence_channel_closed",
                                "detail": "the kernel closed the pipe on which its sandbox reports refusals"})
        ns = self.info.get("pid-namespace") if getattr(self, "info", None) else None
        if ns and self.proc.poll() is None:
            others = [p for p in isolation.processes_in_namespace(ns) if p != self.info.get("child-pid")]
            if others:
                self.events.append({"kind": "processes_left_running",
                                    "detail": f"{len(others)} process(es) the submission started were still "
                                              "running and were killed with its kernel"})
        self.stopped_by_grader = self.proc.poll() is None
        pid = self.info.get("child-pid") if getattr(self, "info", None) else None
        for target in ([pid] if pid else []):
            try:
                os.kill(target, signal.SIGKILL)  # PID 1 of the namespace: the kernel kills all the rest
            except (ProcessLookupError, PermissionError):
                pass
        try:
            if self.options.trust_submissions:
                os.killpg(self.proc.pid, signal.SIGKILL)  # no sandbox: the kernel's own session
            else:
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:  # bwrap reaps its PID 1 and exits; its usage includes the kernel's
                    got, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
                    if got:
                        self.proc.returncode = os.waitstatus_to_exitcode(status)
                        self.max_rss_mb = max(self.max_rss_mb, round(usage.ru_maxrss / 1024))  # the largest process
                        self.cpu_s += usage.ru_utime + usage.ru_stime
                        break
                    time.sleep(0.01)
        except (ProcessLookupError, PermissionError, ChildProcessError):
            pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.last_code = self.proc.returncode
        for fd in (self.requests, self.replies):
            try:
                os.close(fd)
            except OSError:
                pass
        self.out.join(5)
        self.hook.join(5)
        self.output_bytes += self.out.count
        self.hook_lines += [line for line in self.hook.lines if line not in self.hook_lines][:200]
        for kind, n in self.hook.kinds.items():
            if kind in self.hook_kinds or len(self.hook_kinds) < 64:
                self.hook_kinds[kind] = self.hook_kinds.get(kind, 0) + n
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
        self.proc = None

    def death_reason(self) -> str:
        self.kill()
        code = self.last_code
        tail = self.log_tail()
        if self.stopped_by_grader:
            return "the kernel was stopped by the grader"
        if any(m in tail for m in OOM_MARKERS) or code in (-signal.SIGKILL, 128 + signal.SIGKILL):
            return f"the kernel ran out of memory (exit code {code})"
        return f"the kernel died (exit code {code})"

    def log_tail(self, n: int = 2000) -> str:
        return self.out.tail[-n:].decode("utf-8", "replace") if getattr(self, "out", None) else ""


# ----------------------------------------------------------------------------------------------
# The agent on the other side
# ----------------------------------------------------------------------------------------------
class RemoteAgent:
    """Sends the checks' requests to the agent in the kernel over its pipe; reads back data only,
    checked and copied (`course_tools.agent.loads`) before any check looks at it."""

    def __init__(self, kernel: Kernel, events: list):
        self.kernel, self.events = kernel, events

    def request(self, request: dict, timeout: float) -> dict:
        status, raw = self.kernel.request(dumps(to_wire(request)), timeout)
        if status in ("killed", "died"):
            kind = "timeout" if status == "killed" else ("out_of_memory" if "memory" in self.kernel.death_reason()
                                                         else "kernel_died")
            raise KernelLost(kind, "the kernel stopped answering" if status == "killed" else self.kernel.death_reason())
        if status == "timeout":
            self.events.append({"kind": "timeout", "detail": f"a check's call ran past {timeout:g} s"})
            return _error("Timeout", "interrupted")
        try:
            reply = loads(raw)
        except Exception as err:  # too large, not plain data, a tensor that is not what it claims
            self.kernel.events.append({"kind": "invalid_reply", "detail": f"{err}"[:300]})
            return _error("TransferError", f"the reply could not be read as data: {err}"[:300])
        if not isinstance(reply, dict) or reply.get("ok") not in (True, False):
            return _error("TransferError", "the reply was not a reply")
        # what the checks copy into the report: a few short strings and a number, whatever was sent
        listed = {k: reply.get(k) if isinstance(reply.get(k), list) else [] for k in ("warnings", "mutated")}
        reply["warnings"] = [str(w)[:200] for w in listed["warnings"][:5]]
        reply["mutated"] = [str(m)[:100] for m in listed["mutated"][:20]]
        seconds = reply.get("seconds", 0.0)
        reply["seconds"] = float(seconds) if type(seconds) in (int, float) and 0 <= seconds < 1e9 else 0.0
        if not reply["ok"]:
            err = reply.get("error") if isinstance(reply.get("error"), dict) else {}
            reply["error"] = {k: str(err.get(k, ""))[:600] for k in ("type", "message", "where")}
            if reply["error"]["type"] == "MemoryError":
                self.events.append({"kind": "out_of_memory", "detail": "a check's call ran out of memory"})
        return reply


def _error(kind: str, message: str) -> dict:
    return {"ok": False, "error": {"type": kind, "message": message, "where": ""}}


# ----------------------------------------------------------------------------------------------
# One submission
# ----------------------------------------------------------------------------------------------
FATAL = ("timeout", "kernel_died", "out_of_memory")
# What the kernel's hook may report (anything else on its pipe is reported as unreadable_report)
HOOK_KINDS = {"forbidden_read", "forbidden_write", "forbidden_import", "subprocess", "signal", "network", "ctypes",
              "introspection", "code_patching"}
# What the grader sees from outside the sandbox and reports as integrity flags
OUTSIDE_FLAGS = {"processes_left_running", "evidence_channel_closed", "protocol_violation", "invalid_reply"}


def grade_submission(path: Path, source: Path | None, options: Options) -> dict:
    """Grade one notebook. Returns the result dict; never raises for anything the submission does."""
    from course_lib.checks import EXERCISES

    started = time.monotonic()
    raw, problem = read_submission(path)
    result: dict = {
        "submission": str(path), "source": source.name if source else None, "status": "graded",
        "score": 0.0, "max_score": 0.0, "percent": 0.0, "exercises": [], "integrity": [], "flagged": False,
        "cell_errors": [], "events": [], "output_bytes": 0,
        "grader": {"seed": options.seed, "timeout": options.timeout, "cell_timeout": options.cell_timeout,
                   "memory_mb": options.memory_mb, "submission_sha256": notebooks.sha256(raw or b""),
                   "sandbox": "none (--trust-submissions)" if options.trust_submissions else "bubblewrap"},
    }
    if problem == "symlink":
        result["integrity"].append({"kind": "submission_is_symlink", "cell_id": None,
                                    "detail": "the submission is a symbolic link; it was not followed"})
    if source is None:
        return _finish(result, "invalid", started, detail="no notebook in solutions/ matches this submission "
                                                         "(by metadata course.source or by file name)")
    src_nb = nbformat.read(source, as_version=4)
    result["grader"]["source_sha256"] = notebooks.sha256(source.read_bytes())
    if raw is not None and result["grader"]["source_sha256"] == result["grader"]["submission_sha256"]:
        result["integrity"].append({"kind": "copy_of_solution", "cell_id": None,
                                    "detail": "the file is byte for byte the solution notebook (a copy or a hard link)"})
    order = [notebooks.exercise_of(c) for c in src_nb.cells if notebooks.is_checker(c)]
    try:
        if problem:
            raise ValueError(problem)
        sub_nb = notebooks.parse_submission(raw.decode("utf-8"))
    except Exception as err:
        result["exercises"] = [EXERCISES[e].not_run("not run: the file is not a readable notebook").to_dict()
                               for e in order]
        return _finish(result, "invalid", started, detail=f"not a readable notebook: {err}"[:300])
    result["integrity"] += notebooks.source_mismatch(path, sub_nb, source)
    restored = notebooks.restore_checker_cells(sub_nb, src_nb)
    result["integrity"] += restored.integrity
    result["integrity"] += _suspicious_source(restored.notebook)

    own_tree = None
    if options.kernel_tree is None and not options.trust_submissions:
        isolation.check_available()
    if options.kernel_tree is None:  # graded on its own (tests): a kernel tree for this submission only
        own_tree = Path(tempfile.mkdtemp(prefix="course-tree-"))
        isolation.build_kernel_tree(notebooks.ROOT, own_tree / "tree", options.python)
    kernel = Kernel(options, Path(options.kernel_tree) if options.kernel_tree else own_tree / "tree")
    results: dict[str, ExerciseResult] = {}
    history: list[str] = []
    try:
        t = time.monotonic()
        kernel.start()
        result["seconds_kernel_start"] = round(time.monotonic() - t, 2)
        _run_cells(restored, kernel, options, started, results, history, result)
    except Exception as err:  # the grader's own failure (cannot start a kernel, ...)
        result["events"].append({"kind": "grader_error", "detail": repr(err)[:500]})
        result["status"] = "grader_error"
    finally:
        kernel.kill()
        result["output_bytes"] = kernel.output_bytes
        result["grader"].update({"kernel_starts": kernel.starts, "kernel_max_rss_mb": kernel.max_rss_mb,
                                 "kernel_cpu_seconds": round(kernel.cpu_s, 2)})
        result["integrity"] += _hook_events(kernel.hook_lines, kernel.hook_kinds) + [
            {**e, "cell_id": None} for e in kernel.events if e["kind"] in OUTSIDE_FLAGS]
        result["events"] += [e for e in kernel.events if e["kind"] not in OUTSIDE_FLAGS]
        if own_tree is not None:
            shutil.rmtree(own_tree, ignore_errors=True)
    for ex_id in order:
        if ex_id not in results:
            results[ex_id] = EXERCISES[ex_id].not_run("not run: the notebook stopped before this check cell",
                                                     status="not_run")
    result["exercises"] = [results[e].to_dict() for e in order]
    return _finish(result, result["status"], started)


def _run_cells(restored, kernel: Kernel, options: Options, started: float, results: dict, history: list,
               result: dict) -> None:
    from course_lib.checks import EXERCISES

    deadline = started + options.timeout
    seeds = [options.seed + k for k in range(3)]
    for index, cell in enumerate(restored.notebook.cells):
        if cell.cell_type != "code" or str(cell.get("id")) in restored.extra_checkers:
            continue
        if is_setup_cell(cell.source):  # the Colab setup cell: nothing to grade, and the grader stays offline
            continue
        left = deadline - time.monotonic()
        if left <= 0:
            _fatal(result, "timeout", f"the notebook ran past its {options.timeout:g} s", cell)
            return
        if notebooks.is_checker(cell):
            ex = EXERCISES[notebooks.exercise_of(cell)]
            t = time.monotonic()
            try:
                results[ex.id] = ex.run(RemoteAgent(kernel, result["events"]), seeds)
            except KernelLost as lost:
                results[ex.id] = lost.partial or ex.not_run(lost.message, lost.kind)
                _fatal(result, lost.kind, f"during the checks of {ex.id}: {lost.message}", cell)
                if not _recover(kernel, history, options, deadline, result):
                    return
            result.setdefault("seconds_checks", 0.0)
            result["seconds_checks"] = round(result["seconds_checks"] + time.monotonic() - t, 2)
            kinds = [e["kind"] for e in result["events"] if e["kind"] in FATAL]
            if kinds and result["status"] == "graded":  # a call stopped inside the checks counts too
                result["status"] = kinds[0]
            continue
        out = kernel.execute(cell.source, min(options.cell_timeout, left))
        if out.kind == "ok":
            history.append(cell.source)
            continue
        result["cell_errors"].append({"cell_id": cell.get("id"), "index": index, "ename": out.ename,
                                      "evalue": out.evalue})
        if out.kind == "error":
            if out.out_of_memory:
                _fatal(result, "out_of_memory", f"cell {cell.get('id')}: {out.ename}: {out.evalue}"[:300], cell)
            continue
        kind = {"timeout": "timeout", "killed": "timeout"}.get(out.kind) or (
            "out_of_memory" if "memory" in out.evalue else "kernel_died")
        _fatal(result, kind, f"cell {cell.get('id')}: {out.evalue}", cell)
        if out.kind != "timeout" and not _recover(kernel, history, options, deadline, result):
            return


def _fatal(result: dict, kind: str, detail: str, cell) -> None:
    result["events"].append({"kind": kind, "cell_id": cell.get("id"), "detail": detail[:500]})
    if result["status"] == "graded":
        result["status"] = kind


def _recover(kernel: Kernel, history: list, options: Options, deadline: float, result: dict) -> bool:
    """Replace a dead kernel: start a fresh one and replay the cells that had run without error."""
    kernel.kill()
    if kernel.starts >= 4 or time.monotonic() > deadline:
        result["events"].append({"kind": "gave_up", "detail": "too many kernel restarts, or no time left"})
        return False
    try:
        kernel.start()
    except Exception as err:
        result["events"].append({"kind": "gave_up", "detail": f"could not restart the kernel: {err!r}"[:300]})
        return False
    for code in history:
        left = deadline - time.monotonic()
        out = kernel.execute(code, max(1.0, min(options.cell_timeout, left)))
        if out.kind in ("killed", "died") or left <= 0:
            result["events"].append({"kind": "gave_up", "detail": "the replay after a restart failed too"})
            return False
    result["events"].append({"kind": "restarted", "detail": f"fresh kernel; replayed {len(history)} cells"})
    return True


def _suspicious_source(nb) -> list[dict]:
    found = []
    for cell in nb.cells:
        if cell.cell_type != "code" or notebooks.is_checker(cell):
            continue
        for pattern, meaning in SUSPICIOUS.items():
            if pattern in cell.source:
                found.append({"kind": "suspicious_code", "cell_id": cell.get("id"), "detail": f"{meaning} ({pattern!r})"})
    return found


def _hook_events(lines: list[str], kinds: dict[str, int]) -> list[dict]:
    """The refusals the kernel's hook reported on its pipe: one flag per distinct refusal among the
    first ones kept, and one for each kind of refusal reported only later."""
    events, seen = [], set()
    for line in lines[:200]:
        kind, _, detail = line.partition("\t")
        kind = kind if kind in HOOK_KINDS else "unreadable_report"
        if (kind, detail) not in seen:
            seen.add((kind, detail))
            events.append({"kind": kind, "cell_id": None, "detail": f"refused: {detail}"[:300]})
    for kind, n in kinds.items():
        kind = kind if kind in HOOK_KINDS else "unreadable_report"
        if kind not in {k for k, _ in seen}:
            seen.add((kind, ""))
            events.append({"kind": kind, "cell_id": None, "detail": f"refused {n} time(s); the details came "
                                                                      "after the first 200 reports"})
    return events


def read_submission(path: Path) -> tuple[bytes | None, str | None]:
    """The submission's bytes, read without following a symbolic link and only up to the size
    limit: (data, None), or (None, what is wrong)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as err:
        return None, "symlink" if err.errno == errno.ELOOP else f"the file cannot be read: {err.strerror}"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, "not a regular file"
        if st.st_size > MAX_SUBMISSION_BYTES:
            return None, f"the file is larger than {MAX_SUBMISSION_BYTES // 2**20} MiB"
        chunks, total = [], 0
        while total <= MAX_SUBMISSION_BYTES:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > MAX_SUBMISSION_BYTES:
            return None, f"the file is larger than {MAX_SUBMISSION_BYTES // 2**20} MiB"
        return b"".join(chunks), None
    finally:
        os.close(fd)


def _finish(result: dict, status: str, started: float, detail: str | None = None) -> dict:
    result["status"] = status
    if detail:
        result["events"].append({"kind": status, "detail": detail})
    result["score"] = round(sum(e["score"] for e in result["exercises"]), 6)
    result["max_score"] = round(sum(e["max_score"] for e in result["exercises"]), 6)
    result["percent"] = round(100 * result["score"] / result["max_score"], 1) if result["max_score"] else 0.0
    result["flagged"] = any(i["kind"] != "suspicious_code" for i in result["integrity"])
    result["seconds"] = round(time.monotonic() - started, 2)
    return result
