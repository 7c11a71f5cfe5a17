"""The kernel a submission runs in: an ipykernel started behind limits and a Python audit hook.

The grader starts it as ``python -m course_tools.grading.sandbox -f CONNECTION_FILE`` with its
settings in ``COURSE_SANDBOX_*`` environment variables. Before any of the learner's code runs it:

1. sets resource limits: address space (memory), size of any file written, no core dumps;
2. imports torch, numpy and the agent (``course_tools.agent``), and registers the agent as the
   module ``_course_agent``, through which the grader's checks call the learner's code;
3. installs an audit hook (PEP 578; Python offers no way to remove one) that refuses, and logs to
   a file the grader reads:
   - reading or listing the forbidden folders (solutions/, the checks, .git, the other
     submissions, the grader's reports) and other processes' /proc entries;
   - writing, deleting or renaming anything outside the submission's scratch folder;
   - importing the checks or the grader (course_lib.checks, course_tools.checking, course_tools.grading);
   - starting processes, signalling other processes (the grader), opening network connections,
     raw memory through ctypes, walking the garbage collector's objects, replacing code objects
     (the usual ways around a hook);
4. starts the kernel.

This is defence in depth, not the guarantee: scores never depend on anything in this process.
The checks run in the grader's process and receive only data from here (``course_tools/agent.py``).
An in-process hook can be defeated by determined code; what that code can reach is its own
process, and the attempt leaves a trace in the log and in the submission's source.
"""

from __future__ import annotations

import os
import resource
import signal
import sys

ENV_DENY = "COURSE_SANDBOX_DENY"  # os.pathsep-separated folders that may not be read
ENV_WRITABLE = "COURSE_SANDBOX_WRITABLE"  # os.pathsep-separated folders that may be written
ENV_LOG = "COURSE_SANDBOX_LOG"  # file the hook appends its refusals to
ENV_MEMORY_MB = "COURSE_SANDBOX_MEMORY_MB"
ENV_FILE_MB = "COURSE_SANDBOX_FILE_MB"
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


def make_hook(deny: tuple[str, ...], writable: tuple[str, ...], log_fd: int):
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

    def check_write(p, _writable=writable):
        if p is not None and p != "/dev/null" and not under(p, _writable):
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


def install_agent() -> None:
    """Register ``_course_agent.serve(request_path, reply_path)`` for the grader's checks."""
    import types

    from course_tools.agent import AgentCore, dumps, loads

    def namespace() -> dict:
        from IPython import get_ipython

        shell = get_ipython()
        return shell.user_ns if shell is not None else {}

    core = AgentCore(namespace)

    def serve(request_path: str, reply_path: str) -> None:
        try:
            with open(request_path, "rb") as f:
                reply = core.serve(loads(f.read()))
            data = dumps(reply)
        except BaseException as err:  # the reply itself could not be built or saved
            data = dumps({"ok": False, "error": {"type": "TransferError", "message": repr(err)[:300], "where": ""}})
        with open(reply_path, "wb") as f:
            f.write(data)

    module = types.ModuleType("_course_agent")
    module.serve = serve
    sys.modules["_course_agent"] = module


def main(argv: list[str]) -> None:
    set_limits(int(os.environ.get(ENV_MEMORY_MB, "0")), int(os.environ.get(ENV_FILE_MB, "0")))
    sys.dont_write_bytecode = True
    import numpy  # noqa: F401  (loaded before the hook: their own imports read many files)
    import torch  # noqa: F401

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.font_manager  # noqa: F401  (builds or reads the font cache, which runs fc-list)
    from ipykernel.kernelapp import IPKernelApp

    install_agent()
    app = IPKernelApp.instance()
    app.initialize(argv)  # reads the connection file and sets the kernel up: before the hook
    deny = tuple(os.path.realpath(p) for p in os.environ.get(ENV_DENY, "").split(os.pathsep) if p)
    writable = tuple(os.path.realpath(p) for p in os.environ.get(ENV_WRITABLE, "").split(os.pathsep) if p)
    log_fd = os.open(os.environ[ENV_LOG], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    sys.addaudithook(make_hook(deny, writable, log_fd))
    app.start()


if __name__ == "__main__":
    main(sys.argv[1:])
