"""The operating-system sandbox a submission's kernel runs in (Linux, Bubblewrap), seen from the grader.

Each kernel is started as

    bwrap [namespaces, mounts] -- prlimit [limits] -- setpriv [a fresh unprivileged uid] -- python -s
        /course/course_tools/grading/sandbox.py

so that, whatever the submission's code does (native code through ``ctypes``, ``fork_exec``,
``setsid``, file descriptors), the operating system holds it to:

- its own PID namespace, the kernel as PID 1: when the kernel ends, every process it started ends
  with it (``setsid`` or not), and it sees no other process;
- no network (a namespace with only its own loopback), its own IPC and hostname;
- an unprivileged user: as root, a uid of its own drawn per kernel (no capabilities, no new
  privileges); otherwise a user namespace that maps it to the instructor's uid;
- a private writable scratch folder and a private ``/tmp``, both size-limited tmpfs that vanish with
  the kernel (a restart starts from empty ones: nothing a crashed kernel left can shape the next);
- read-only: the Python runtime, and the kernel tree (`build_kernel_tree`), a copy made at the start
  of the batch of ``course_lib`` without its checks, the shipped weights, the agent and the kernel's
  own entry point, and nothing else of the course: no ``solutions/``, no grader, no other submission;
- limits the kernel enforces: address space, processes, size of one file, CPU seconds, no core files.

The grader talks to the kernel over pipes it created and passes in (never files in a folder the
kernel can write); see ``sandbox.py`` for the kernel's side and ``executor.py`` for the grader's.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ENV_BWRAP = "COURSE_BWRAP"  # path of bwrap to use; set to "" (or a missing path) to test the refusal
ENV_USERNS = "COURSE_SANDBOX_USERNS"  # "1": the user-namespace sandbox even as root (how a non-root instructor runs)
COURSE = "/course"  # where the kernel tree is mounted inside the sandbox
SCRATCH = "/scratch"  # the kernel's working directory inside the sandbox
UID_BASE = 1_000_000  # kernels started by root run as UID_BASE + a random number below UID_SPAN
UID_SPAN = 1_000_000
# What the kernel tree holds of the course: the lesson library (without its checks), the agent, and
# the kernel's entry point. ``course_tools/grading/__init__.py`` imports nothing.
# The kernel's entry point, run as a script: Python puts the script's (read-only) folder first on
# sys.path, never the working directory, whose files the submission writes (``-m`` would put it there).
ENTRY_POINT = "course_tools/grading/sandbox.py"
TREE_FILES = ("course_tools/__init__.py", "course_tools/agent.py", "course_tools/grading/__init__.py",
              "course_tools/grading/sandbox.py")

NO_SANDBOX_HELP = """\
grading needs an operating-system sandbox, and none is available here: {reason}

The grader runs every submission's code in a Linux sandbox (Bubblewrap: its own PID namespace, no
network, an unprivileged user, read-only access to the course's library only). Your options:
  - grade on a Linux machine or container with Bubblewrap installed (Debian/Ubuntu:
    apt-get install bubblewrap) and user namespaces enabled (or run the grader as root there);
  - to grade your own work only, where you trust every notebook, add --trust-submissions: the
    kernels then run without the sandbox, with only resource limits and an in-process audit hook."""


class SandboxUnavailable(RuntimeError):
    """No operating-system sandbox can be started here; the message says what the instructor can do."""


@dataclass
class Limits:
    memory_mb: int = 4096  # address space of each process in the sandbox (RLIMIT_AS)
    file_mb: int = 256  # largest file the kernel may write (RLIMIT_FSIZE); also each tmpfs's size
    processes: int = 64  # processes and threads of the kernel's uid (RLIMIT_NPROC)
    cpu_s: int = 900  # CPU seconds of one kernel (RLIMIT_CPU)


def bwrap_path() -> str | None:
    if ENV_BWRAP in os.environ:
        p = os.environ[ENV_BWRAP]
        return p if p and os.access(p, os.X_OK) else None
    return shutil.which("bwrap")


_probed: dict[str, str | None] = {}


def check_available() -> None:
    """Raise `SandboxUnavailable` unless a sandbox can be started here (probed once per process)."""
    key = f"{sys.platform}:{bwrap_path()}"
    if key not in _probed:
        _probed[key] = _probe()
    if _probed[key] is not None:
        raise SandboxUnavailable(NO_SANDBOX_HELP.format(reason=_probed[key]))


def _probe() -> str | None:
    if not sys.platform.startswith("linux"):
        return f"this is {sys.platform}, and the sandbox needs Linux"
    bwrap = bwrap_path()
    if bwrap is None:
        return "Bubblewrap (bwrap) is not installed" + (f" ({ENV_BWRAP}={os.environ[ENV_BWRAP]!r})"
                                                         if ENV_BWRAP in os.environ else "")
    if _as_root() and not shutil.which("setpriv"):
        return "setpriv (util-linux) is missing: it drops the kernel to an unprivileged uid"
    argv = [bwrap, *_namespaces(), "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "--", "true"]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"bwrap could not be run: {err}"
    if proc.returncode != 0:
        return f"bwrap failed ({proc.stderr.strip()[:300] or proc.returncode}); are user namespaces disabled?"
    return None


def _as_root() -> bool:
    """Whether kernels get a uid of their own (root), rather than a user namespace (anyone else)."""
    return os.geteuid() == 0 and os.environ.get(ENV_USERNS) != "1"


def _namespaces() -> list[str]:
    common = ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
              "--die-with-parent", "--new-session", "--as-pid-1"]
    if _as_root():
        return common  # setpriv then drops to a uid of the kernel's own
    return ["--unshare-user", "--uid", "65534", "--gid", "65534", *common]


# ----------------------------------------------------------------------------------------------
# The kernel tree: what the sandbox may read of the course
# ----------------------------------------------------------------------------------------------
def build_kernel_tree(root: Path, dest: Path, python: str = sys.executable) -> Path:
    """Copy into ``dest`` what a kernel needs of the course: ``course_lib`` without ``checks/``,
    ``weights/``, the agent and the kernel's entry point; and build matplotlib's font cache there
    once, so that no kernel runs ``fc-list``. Returns ``dest``."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(root / "course_lib", dest / "course_lib", ignore=lambda d, names: (
        ignore(d, names) | ({"checks"} if Path(d).resolve() == (root / "course_lib").resolve() else set())))
    if (root / "weights").is_dir():
        shutil.copytree(root / "weights", dest / "weights", ignore=ignore)
    for rel in TREE_FILES:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / rel, dest / rel)
    (dest / "mpl").mkdir()
    subprocess.run([python, "-c", "import matplotlib; matplotlib.use('Agg'); import matplotlib.font_manager"],
                   env={**os.environ, "MPLCONFIGDIR": str(dest / "mpl")}, capture_output=True, timeout=300)
    for p in [dest, *dest.rglob("*")]:  # readable by the kernels' uids, writable by nobody but root
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dest


# ----------------------------------------------------------------------------------------------
# The command line of one kernel
# ----------------------------------------------------------------------------------------------
def runtime_paths() -> list[str]:
    """The folders of the Python runtime to mount read-only: the environment, its base installation,
    and any other folder on sys.path outside /usr (mounted whole), but nothing of the course's own
    folder except an environment kept inside it (``.venv``): the kernel tree replaces the course."""
    course = os.path.realpath(os.environ.get("COURSE_ROOT") or Path(__file__).resolve().parents[2])
    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    candidates = prefixes | {os.path.realpath(p) for p in sys.path if p and os.path.isdir(p)}

    def under(p: str, roots) -> bool:
        return any(p == r or p.startswith(r + "/") for r in roots)

    keep: list[str] = []
    for p in sorted(candidates, key=len):
        if under(p, ["/usr"]) or p == "/" or under(p, keep):
            continue
        if under(p, [course]) and not under(p, prefixes - {course}):
            continue
        keep.append(p)
    return keep


def command(tree: Path, python: str, info_fd: int, limits: Limits, env: dict[str, str]) -> list[str]:
    """The argv that starts one sandboxed kernel (see the module's docstring)."""
    bwrap = bwrap_path()
    if bwrap is None:
        raise SandboxUnavailable(NO_SANDBOX_HELP.format(reason="Bubblewrap (bwrap) is not installed"))
    argv = [bwrap, *_namespaces(), "--info-fd", str(info_fd), "--clearenv"]
    made: set[str] = {"/"}

    def dirs_for(dest: str) -> None:  # parents of a mount point: created world-readable, not 0700
        parts = Path(dest).parts[1:-1]
        for i in range(len(parts)):
            d = "/" + "/".join(parts[: i + 1])
            if d not in made:
                made.add(d)
                argv.extend(["--perms", "0755", "--dir", d])

    for system in ("/usr", "/etc/ld.so.cache", "/etc/localtime"):
        if os.path.exists(system):
            dirs_for(system)
            argv.extend(["--ro-bind", system, system])
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        if os.path.islink(f"/{name}"):
            argv.extend(["--symlink", os.readlink(f"/{name}"), f"/{name}"])
        elif os.path.isdir(f"/{name}"):
            argv.extend(["--ro-bind", f"/{name}", f"/{name}"])
    size = str(max(16, limits.file_mb) * 2**20)
    # the private /tmp first: a runtime folder that lives under /tmp (a course cloned there, with its .venv)
    # is then mounted into it, not hidden by it
    argv += ["--perms", "1777", "--size", size, "--tmpfs", "/tmp"]
    made.add("/tmp")
    for p in runtime_paths():
        dirs_for(p)
        argv.extend(["--ro-bind", p, p])
    argv += ["--ro-bind", str(tree), COURSE, "--proc", "/proc", "--dev", "/dev",
             "--perms", "1777", "--size", str(64 * 2**20), "--tmpfs", "/dev/shm", "--remount-ro", "/dev",
             "--perms", "1777", "--size", size, "--tmpfs", SCRATCH, "--chdir", SCRATCH]
    for k, v in env.items():
        argv.extend(["--setenv", k, v])
    # RLIMIT_NPROC counts the processes of the kernel's uid: its own uid as root, or the uid of its user
    # namespace otherwise (counted per namespace); either way only the sandbox's processes.
    argv += ["--", "prlimit", f"--as={limits.memory_mb * 2**20}", f"--fsize={limits.file_mb * 2**20}",
             f"--cpu={limits.cpu_s}", "--core=0", f"--nproc={limits.processes}"]
    if _as_root():
        uid = UID_BASE + secrets.randbelow(UID_SPAN)
        argv += ["--", "setpriv", f"--reuid={uid}", f"--regid={uid}",
                 "--clear-groups", "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"]
    argv += ["--", python, "-s", f"{COURSE}/{ENTRY_POINT}"]
    return argv


def read_info(fd: int, deadline_s: float = 60.0) -> dict:
    """bwrap's --info-fd JSON (the kernel's host pid, its namespaces); {} if it never comes."""
    import select

    data = b""
    while True:
        ready, _, _ = select.select([fd], [], [], deadline_s)
        if not ready:
            return {}
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
        try:
            return json.loads(data)
        except ValueError:
            continue
    try:
        return json.loads(data)
    except ValueError:
        return {}


def processes_in_namespace(pid_namespace: int) -> list[int]:
    """Host pids of the processes in a PID namespace (the sandbox's), found from outside it."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/pid").st_ino == pid_namespace:
                pids.append(int(entry))
        except OSError:
            continue
    return pids
