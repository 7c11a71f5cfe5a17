"""The kernel a submission runs in, on the inside of the sandbox: a small IPython runner on pipes.

The grader starts it in an operating-system sandbox (``isolation.py``: Bubblewrap, its own PID
namespace, no network, an unprivileged uid, read-only course files, kernel-enforced limits) as
``python -s /course/course_tools/grading/sandbox.py`` (a script: its read-only folder, not the
working directory, is first on sys.path), with three pipes it created and passed in (their
numbers in ``COURSE_SANDBOX_FDS``): requests in, replies out, and events out. The runner:

1. sets resource limits itself only when there is no sandbox (``--trust-submissions``); in the
   sandbox the operating system has set them before Python started;
2. imports torch, numpy, matplotlib and IPython, and builds an IPython shell (magics, ``!``) whose
   namespace the grader's checks reach through the agent (``course_tools/agent.py``);
3. installs an audit hook (PEP 578) that refuses the usual ways out (subprocesses, signals, network,
   raw memory, reading the names of forbidden folders, writing outside the scratch folder and
   ``/tmp``) and reports each refusal on the events pipe. The grader reads that pipe as it is
   written: what was reported cannot be taken back. The hook only names what was tried; what a
   submission can do is decided by the sandbox, not by the hook;
4. answers frames: ``E`` runs a cell, ``A`` serves one request of the checks. Each frame is one type
   byte, an 8-byte length and a payload; a reply carries the request's sequence number.

A submission controls this process entirely (it may close the pipes, forge frames or exit): the
grader treats everything it reads from here as untrusted data (``executor.py``).
"""

from __future__ import annotations

import os
import resource
import signal
import sys

ENV_DENY = "COURSE_SANDBOX_DENY"  # os.pathsep-separated folders whose reading is refused and reported
ENV_WRITABLE = "COURSE_SANDBOX_WRITABLE"  # os.pathsep-separated folders that may be written
ENV_PROTECT = "COURSE_SANDBOX_PROTECT"  # folders never to be written, even inside a writable one (the course)
ENV_FDS = "COURSE_SANDBOX_FDS"  # "requests,replies,events": the pipes' descriptor numbers
ENV_MEMORY_MB = "COURSE_SANDBOX_MEMORY_MB"  # set only without a sandbox: the runner sets its own limits
ENV_FILE_MB = "COURSE_SANDBOX_FILE_MB"
ENV_MPL_CACHE = "COURSE_SANDBOX_MPL_CACHE"  # read-only folder with matplotlib's font cache
MAX_CELL_BYTES = 16 * 2**20  # a larger frame from the grader is a protocol error
FORBIDDEN_MODULES = ("course_lib.checks", "course_tools.checking", "course_tools.grading")
_SPAWN = {"subprocess.Popen", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty",
          "os.startfile", "pty.spawn"}
# ctypes may load libraries (many packages do, on import); it may not read raw memory. (Writing it
# with ctypes.memmove raises no audit event: a known limit, reported by the grader's source scan.)
_CTYPES = {"ctypes.string_at", "ctypes.wstring_at", "ctypes.PyObj_FromPtr"}
_INTROSPECTION = {"gc.get_objects", "gc.get_referrers", "gc.get_referents"}
_NETWORK = {"socket.connect", "socket.sendto", "urllib.Request"}  # to anywhere but this machine
_LOOPBACK = {"127.0.0.1", "::1", "localhost", ""}
_SIGNALS = {"os.kill", "os.killpg", "signal.pthread_kill"}
_WRITE_EVENTS = {"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1), "os.replace": (0, 1),
                 "os.chmod": (0,), "os.chown": (0,), "os.utime": (0,), "os.truncate": (0,), "os.link": (1,),
                 "os.symlink": (1,), "shutil.rmtree": (0,), "os.setxattr": (0,), "os.removexattr": (0,),
                 "shutil.copyfile": (1,), "shutil.move": (1,)}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def set_limits(memory_mb: int, file_mb: int) -> None:
    if memory_mb > 0:
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb * 2**20, memory_mb * 2**20))
    if file_mb > 0:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large write fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_mb * 2**20, file_mb * 2**20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def make_hook(deny: tuple[str, ...], writable: tuple[str, ...], log_fd: int, protect: tuple[str, ...] = ()):
    """The audit hook. Everything it uses is bound now, as defaults of functions whose code and
    defaults the hook protects, so that patching modules later does not change what it does."""
    import _thread

    me = str(os.getpid())
    itself: list = [None]

    def path_of(p, _realpath=os.path.realpath, _join=os.path.join, _getcwd=os.getcwd, _fspath=os.fspath):
        if p is None:
            p = "."
        if isinstance(p, int):  # a file descriptor: already opened, already checked
            return None
        p = _fspath(p)
        if isinstance(p, bytes):
            p = p.decode("utf-8", "replace")
        return _realpath(_join(_getcwd(), p))

    def under(p, roots):
        return any(p == r or p.startswith(r + "/") for r in roots)

    def refuse(kind, detail, exc, _write=os.write, _fd=log_fd):
        _write(_fd, f"{kind}\t{detail}\n".encode("utf-8", "replace")[:2000])
        raise exc(f"refused by the grader's sandbox: {kind} {detail}")

    def check_read(p, _deny=deny, _me=me):
        if p is None:
            return
        if under(p, _deny):
            refuse("forbidden_read", p, PermissionError)
        parts = p.split("/")
        if len(parts) > 2 and parts[1] == "proc" and parts[2].isdigit() and parts[2] != _me:
            refuse("forbidden_read", p, PermissionError)  # another process's memory or files

    def check_write(p, _writable=writable, _protect=protect):
        # the course's own folder on the host may lie under /tmp (a clone there): a write aimed at it is an
        # attempt on the course even where the sandbox's private /tmp would take it harmlessly
        if p is not None and p != "/dev/null" and (not under(p, _writable) or under(p, _protect)):
            refuse("forbidden_write", p, PermissionError)

    def hook(event, args, _busy=set(), _tid=_thread.get_ident, _spawn=frozenset(_SPAWN),
             _ctypes=frozenset(_CTYPES), _intro=frozenset(_INTROSPECTION), _net=frozenset(_NETWORK),
             _wev=dict(_WRITE_EVENTS), _mods=FORBIDDEN_MODULES, _wflags=_WRITE_FLAGS, _itself=itself,
             _signals=frozenset(_SIGNALS), _mypid=os.getpid(), _loopback=frozenset(_LOOPBACK)):
        tid = _tid()
        if tid in _busy:  # an event raised by the hook's own work
            return
        _busy.add(tid)
        try:
            if event == "open":
                p = path_of(args[0])
                check_read(p)
                mode, flags = args[1], args[2] or 0
                if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags & _wflags):
                    check_write(p)
            elif event in ("os.listdir", "os.scandir"):
                check_read(path_of(args[0] if args else None))
            elif event in _wev:
                for i in _wev[event]:
                    if i < len(args):
                        p = path_of(args[i])
                        check_read(p)
                        check_write(p)
                if event in ("os.symlink", "os.link"):
                    check_read(path_of(args[0]))
            elif event == "import":
                name = str(args[0])
                if any(name == m or name.startswith(m + ".") for m in _mods):
                    refuse("forbidden_import", name, ImportError)
            elif event in _spawn:
                refuse("subprocess", event, PermissionError)
            elif event in _signals and not (event == "os.kill" and args[0] == _mypid):
                refuse("signal", f"{event}{tuple(args)}", PermissionError)
            elif event in _net:
                address = args[1] if len(args) > 1 else None
                host = address[0] if isinstance(address, tuple) and address else address
                if not (isinstance(host, str) and (host in _loopback or host.startswith("/"))):
                    refuse("network", f"{event} {address!r}"[:200], PermissionError)
            elif event in _ctypes:
                refuse("ctypes", event, PermissionError)
            elif event in _intro:
                refuse("introspection", event, PermissionError)
            elif event in ("object.__setattr__", "object.__delattr__"):  # setting None is a delete
                target, name = args[0], str(args[1])
                if name in ("__code__", "__globals__", "__defaults__", "__kwdefaults__") and (
                        name == "__code__" or any(target is x for x in _itself)):
                    refuse("code_patching", f"{getattr(target, '__qualname__', type(target).__name__)}.{name}",
                           PermissionError)
        finally:
            _busy.discard(tid)

    itself += [hook, path_of, under, refuse, check_read, check_write]
    return hook


def set_signals() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large write fails with EFBIG instead of killing
    signal.signal(signal.SIGINT, signal.default_int_handler)  # PID 1 ignores signals without a handler


# ----------------------------------------------------------------------------------------------
# Frames
# ----------------------------------------------------------------------------------------------
def write_frame(fd: int, kind: bytes, seq: int, payload: bytes) -> None:
    data = kind + seq.to_bytes(8, "big") + len(payload).to_bytes(8, "big") + payload
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_exact(fd: int, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError("the grader closed the pipe")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int) -> tuple[bytes, int, bytes]:
    head = _read_exact(fd, 17)
    kind, seq, size = head[:1], int.from_bytes(head[1:9], "big"), int.from_bytes(head[9:], "big")
    if size > MAX_CELL_BYTES:
        raise EOFError("a frame larger than the limit")
    return kind, seq, _read_exact(fd, size)


# ----------------------------------------------------------------------------------------------
# The runner
# ----------------------------------------------------------------------------------------------
def _shell():
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    config = Config()
    config.HistoryManager.enabled = False  # no sqlite file: nothing in the scratch folder is ever read back
    config.InteractiveShell.colors = "NoColor"
    config.InteractiveShell.xmode = "Plain"
    return InteractiveShell.instance(config=config)


def _run_cell(shell, code: str) -> dict:
    try:
        result = shell.run_cell(code, store_history=True, silent=False)
    except KeyboardInterrupt:
        return {"status": "error", "ename": "KeyboardInterrupt", "evalue": ""}
    err = result.error_before_exec or result.error_in_exec
    if err is None:
        return {"status": "ok"}
    try:
        value = str(err)[:500]
    except BaseException:  # a learner's exception whose __str__ fails
        value = "(the error's message could not be read)"
    return {"status": "error", "ename": type(err).__name__[:200], "evalue": value}


def serve(fds: tuple[int, int], shell, core) -> None:
    """Answer the grader's frames until it closes the request pipe."""
    import json

    from course_tools.agent import dumps, loads

    requests, replies = fds
    while True:
        try:
            kind, seq, payload = read_frame(requests)
        except KeyboardInterrupt:  # an interrupt that came between two requests
            continue
        except (EOFError, OSError):
            return
        try:
            if kind == b"E":
                reply = json.dumps(_run_cell(shell, payload.decode("utf-8", "replace"))).encode()
                write_frame(replies, b"R", seq, reply)
            elif kind == b"A":
                try:
                    answer = core.serve(loads(payload))
                    data = dumps(answer)
                except BaseException as err:  # the answer could not be built or saved as data
                    data = dumps({"ok": False, "error": {"type": "TransferError", "message": repr(err)[:300],
                                                          "where": ""}})
                write_frame(replies, b"A", seq, data)
        except KeyboardInterrupt:  # arrived after the work was done, while answering
            write_frame(replies, b"R", seq, b'{"status": "error", "ename": "KeyboardInterrupt", "evalue": ""}')
        except OSError:
            return


def main() -> None:
    set_signals()
    if os.environ.get(ENV_MEMORY_MB):  # no operating-system sandbox: limits of our own
        set_limits(int(os.environ[ENV_MEMORY_MB]), int(os.environ.get(ENV_FILE_MB, "0")))
    sys.dont_write_bytecode = True
    requests, replies, events = (int(x) for x in os.environ[ENV_FDS].split(","))
    cache = os.environ.get(ENV_MPL_CACHE)
    mpl = os.environ.get("MPLCONFIGDIR")
    if cache and mpl and os.path.isdir(cache):  # matplotlib wants a writable cache: copy the prebuilt one
        import shutil

        os.makedirs(mpl, exist_ok=True)
        for name in os.listdir(cache):
            if name.endswith(".json"):
                shutil.copyfile(os.path.join(cache, name), os.path.join(mpl, name))
    import numpy  # noqa: F401  (loaded before the hook: their own imports read many files)
    import torch  # noqa: F401

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.font_manager  # noqa: F401

    from course_tools.agent import AgentCore

    shell = _shell()
    core = AgentCore(lambda: shell.user_ns)
    deny = tuple(os.path.realpath(p) for p in os.environ.get(ENV_DENY, "").split(os.pathsep) if p)
    writable = tuple(os.path.realpath(p) for p in os.environ.get(ENV_WRITABLE, "").split(os.pathsep) if p)
    protect = tuple(os.path.realpath(p) for p in os.environ.get(ENV_PROTECT, "").split(os.pathsep) if p)
    sys.addaudithook(make_hook(deny, writable, events, protect))
    write_frame(replies, b"H", 0, b"ready")
    serve((requests, replies), shell, core)
    os._exit(0)  # without running the learner's atexit handlers


if __name__ == "__main__":
    main()
