"""Grade one submission: run its cells in a sandboxed kernel, and the checks from this process.

The order of events for one notebook:

1. Read the submission (never written), find its source in solutions/, and make a scratch copy
   with the source's check cells put back by cell id (``notebooks.restore_checker_cells``).
2. Start a kernel in the sandbox (``sandbox.py``) with the scratch folder as its working directory.
3. Run the cells in order. A learner cell runs in the kernel with a time limit; its errors are
   recorded and the run goes on. At each check cell, the grader runs that exercise's checks here,
   in its own process, against the kernel's state at that point (so a name reused later in the
   notebook does not change what was graded). The checks reach the learner's objects only through
   `RemoteAgent`, which sends requests as files and gets data back.
4. If a cell or a check times out, dies, or runs out of memory, the kernel is replaced: a fresh one
   replays the cells that had run without error, skips the culprit, and the run goes on. The
   submission's status records the first such event; the notebook's own time limit still holds.

The result is a plain dict (see `grade_submission`), written as JSON by ``batch.py``.
"""

from __future__ import annotations

import os
import queue
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import zmq
from jupyter_client import BlockingKernelClient
from jupyter_client.connect import write_connection_file

from course_tools.agent import dumps, loads, to_wire
from course_tools.checking import ExerciseResult, KernelLost
from course_tools.colab_setup import is_setup_cell
from course_tools.grading import notebooks, sandbox
from course_tools.grading.options import Options

MAX_SUBMISSION_BYTES = 256 * 2**20  # a larger file is not read (status invalid)
MAX_MESSAGE_BYTES = 32 * 2**20  # larger kernel messages drop the connection instead of filling memory
OOM_MARKERS = ("MemoryError", "can't allocate memory", "not enough memory", "std::bad_alloc", "Cannot allocate memory")
SUSPICIOUS = {  # source patterns reported to the instructor (never scored): ways around a sandbox
    "_course_agent": "talks to the grader's agent", "addaudithook": "adds an audit hook",
    "__code__": "replaces code objects", "ctypes": "uses ctypes", "gc.get_objects": "walks the garbage collector",
    "/proc/": "reads /proc", "solutions/": "names the solutions folder", "course_lib.checks": "imports the checks",
    "os._exit": "exits the process", "sys.modules": "edits sys.modules",
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


@dataclass
class Kernel:
    scratch: Path
    private: Path
    options: Options
    proc: subprocess.Popen | None = None
    client: BlockingKernelClient | None = None
    output_bytes: int = 0
    starts: int = 0
    log: Path = field(init=False)

    def __post_init__(self):
        self.log = self.private / f"kernel-{secrets.token_hex(4)}.log"

    def start(self) -> None:
        self.starts += 1
        conn = str(self.private / f"kernel-{secrets.token_hex(8)}.json")
        write_connection_file(conn, ip="127.0.0.1", key=secrets.token_hex(16).encode())
        home = self.scratch
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home), "TMPDIR": str(home), "MPLCONFIGDIR": self.options.cache_dir or str(home / ".mpl"),
            "IPYTHONDIR": str(home / ".ipython"), "MPLBACKEND": "Agg", "COURSE_PROGRESS": "0",
            "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONPATH": str(notebooks.ROOT), "JUPYTER_PLATFORM_DIRS": "1",
            "JPY_PARENT_PID": str(os.getpid()),  # the kernel exits if this process dies
            sandbox.ENV_DENY: os.pathsep.join(self.deny_list()),
            sandbox.ENV_WRITABLE: str(self.scratch.resolve()),
            sandbox.ENV_LOG: str(self.private / "sandbox.log"),
            sandbox.ENV_MEMORY_MB: str(self.options.memory_mb),
            sandbox.ENV_FILE_MB: str(self.options.file_mb),
        }
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [self.options.python, "-m", "course_tools.grading.sandbox", "-f", conn],
                cwd=self.scratch, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,  # its own process group: interrupts and kills reach it all
            )
        if self.options.pid_dir:
            (Path(self.options.pid_dir) / "kernel.pid").write_text(str(self.proc.pid))
        client = BlockingKernelClient()
        client.load_connection_file(conn)
        client.start_channels()
        for channel in (client.iopub_channel, client.shell_channel):
            channel.socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self.client = client
        deadline = time.monotonic() + 90
        while True:
            if not self.alive():
                raise RuntimeError(f"the sandboxed kernel did not start: {self.log_tail()}")
            try:
                client.wait_for_ready(timeout=2)
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise

    def deny_list(self) -> list[str]:
        root = notebooks.ROOT
        return [str(p) for p in (root / "solutions", root / "course_lib" / "checks", root / ".git",
                                 root / "tests", self.private)] + list(self.options.deny)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def execute(self, code: str, timeout: float, silent: bool = False) -> Outcome:
        """Run code; wait for its reply on the shell channel, draining (and counting) the output."""
        start = time.monotonic()
        msg_id = self.client.execute(code, silent=silent, store_history=not silent, allow_stdin=False,
                                     stop_on_error=False)
        deadline = start + timeout
        interrupted = False
        while True:
            self._drain_output()
            try:
                msg = self.client.get_shell_msg(timeout=0.02)
            except queue.Empty:
                msg = None
            if msg is not None and msg.get("parent_header", {}).get("msg_id") == msg_id:
                content = msg.get("content", {})
                took = time.monotonic() - start
                if interrupted:
                    return Outcome("timeout", "Timeout", f"stopped after {timeout:g} s", took)
                if content.get("status") == "ok":
                    return Outcome("ok", seconds=took)
                return Outcome("error", str(content.get("ename", "Error"))[:200], str(content.get("evalue", ""))[:500],
                               took)
            if not self.alive():
                return Outcome("died", "KernelDied", self.death_reason(), time.monotonic() - start)
            now = time.monotonic()
            if now > deadline and not interrupted:
                self.interrupt()
                interrupted, deadline = True, now + 3.0  # a grace period to come back from the interrupt
            elif now > deadline:
                self.kill()
                return Outcome("killed", "Timeout", f"stopped after {timeout:g} s (did not answer an interrupt)",
                               now - start)

    def _drain_output(self) -> None:
        while True:
            try:
                msg = self.client.get_iopub_msg(timeout=0)
            except queue.Empty:
                return
            if msg.get("msg_type") == "stream":
                self.output_bytes += len(msg.get("content", {}).get("text", ""))

    def interrupt(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGINT)

    def kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            if self.options.pid_dir:
                (Path(self.options.pid_dir) / "kernel.pid").unlink(missing_ok=True)
        if self.client is not None:
            self.client.stop_channels()
            self.client = None

    def death_reason(self) -> str:
        code = self.proc.returncode if self.proc is not None else None
        tail = self.log_tail()
        if any(m in tail for m in OOM_MARKERS) or code == -signal.SIGKILL:
            return f"the kernel ran out of memory (exit code {code})"
        return f"the kernel died (exit code {code})"

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log.read_bytes()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""


# ----------------------------------------------------------------------------------------------
# The agent on the other side
# ----------------------------------------------------------------------------------------------
class RemoteAgent:
    """Sends the checks' requests to ``_course_agent`` in the kernel and reads back data only."""

    def __init__(self, kernel: Kernel, events: list):
        self.kernel, self.events = kernel, events
        self.rpc = kernel.scratch / ".rpc"
        self.rpc.mkdir(exist_ok=True)
        self.n = 0

    def request(self, request: dict, timeout: float) -> dict:
        self.n += 1
        req, rep = self.rpc / f"req-{self.n}.pt", self.rpc / f"rep-{self.n}.pt"
        req.write_bytes(dumps(to_wire(request)))
        rep.unlink(missing_ok=True)
        code = f"__import__('sys').modules['_course_agent'].serve({str(req)!r}, {str(rep)!r})"
        out = self.kernel.execute(code, timeout, silent=True)
        if out.kind in ("killed", "died"):
            kind = "timeout" if out.kind == "killed" else ("out_of_memory" if "memory" in out.evalue else "kernel_died")
            raise KernelLost(kind, out.evalue)
        if out.kind == "timeout":
            self.events.append({"kind": "timeout", "detail": f"a check's call ran past {timeout:g} s"})
            return _error("Timeout", "interrupted")
        if out.kind == "error":
            if out.ename == "KeyboardInterrupt":
                return _error("Timeout", "interrupted")
            return _error("AgentError", f"the grader's agent in the kernel failed ({out.ename}: {out.evalue}); "
                                        "was _course_agent or sys.modules changed?")
        try:
            raw = rep.read_bytes()
            reply = loads(raw)
        except Exception as err:  # missing, too large, or not plain data
            return _error("TransferError", f"the reply could not be read as data: {err}"[:300])
        finally:
            req.unlink(missing_ok=True)
            rep.unlink(missing_ok=True)
        if not isinstance(reply, dict) or reply.get("ok") not in (True, False):
            return _error("TransferError", "the reply was not a reply")
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


def grade_submission(path: Path, source: Path | None, options: Options) -> dict:
    """Grade one notebook. Returns the result dict; never raises for anything the submission does."""
    from course_lib.checks import EXERCISES

    started = time.monotonic()
    if path.stat().st_size > MAX_SUBMISSION_BYTES:
        raw = b""
        too_large = True
    else:
        raw, too_large = path.read_bytes(), False
    result: dict = {
        "submission": str(path), "source": source.name if source else None, "status": "graded",
        "score": 0.0, "max_score": 0.0, "percent": 0.0, "exercises": [], "integrity": [], "flagged": False,
        "cell_errors": [], "events": [], "output_bytes": 0,
        "grader": {"seed": options.seed, "timeout": options.timeout, "cell_timeout": options.cell_timeout,
                   "memory_mb": options.memory_mb, "submission_sha256": notebooks.sha256(raw)},
    }
    if source is None:
        return _finish(result, "invalid", started, detail="no notebook in solutions/ matches this submission "
                                                         "(by metadata course.source or by file name)")
    src_nb = nbformat.read(source, as_version=4)
    result["grader"]["source_sha256"] = notebooks.sha256(source.read_bytes())
    order = [notebooks.exercise_of(c) for c in src_nb.cells if notebooks.is_checker(c)]
    try:
        if too_large:
            raise ValueError(f"the file is larger than {MAX_SUBMISSION_BYTES // 2**20} MiB")
        sub_nb = nbformat.reads(raw.decode("utf-8"), as_version=4)
        if not isinstance(sub_nb.get("cells"), list):
            raise ValueError("no cells")
    except Exception as err:
        result["exercises"] = [EXERCISES[e].not_run("not run: the file is not a readable notebook").to_dict()
                               for e in order]
        return _finish(result, "invalid", started, detail=f"not a readable notebook: {err}"[:300])
    restored = notebooks.restore_checker_cells(sub_nb, src_nb)
    result["integrity"] += restored.integrity
    result["integrity"] += _suspicious_source(restored.notebook)

    scratch = Path(tempfile.mkdtemp(prefix="course-grade-"))
    private = Path(tempfile.mkdtemp(prefix="course-grader-"))
    nbformat.write(restored.notebook, scratch / path.name)  # the scratch copy, for the record
    kernel = Kernel(scratch, private, options)
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
        result["integrity"] += _sandbox_log(private / "sandbox.log")
        if not options.keep_scratch:
            shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(private, ignore_errors=True)
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


def _sandbox_log(log: Path) -> list[dict]:
    try:
        lines = log.read_text("utf-8", "replace").splitlines()
    except OSError:
        return []
    events, seen = [], set()
    for line in lines[:200]:
        kind, _, detail = line.partition("\t")
        if (kind, detail) not in seen:
            seen.add((kind, detail))
            events.append({"kind": kind, "cell_id": None, "detail": f"refused: {detail}"[:300]})
    return events


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
