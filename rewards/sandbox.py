"""Run one untrusted Python program in a confined child process.

``run_python(code, stdin, limits) -> SandboxResult``. What confines the program, and who enforces it:

| limit | enforced by |
|---|---|
| wall clock (``wall_s``) | the parent: ``wait(timeout)``, then SIGKILL of the process group and, as root, ``kill(-1)`` as the sandbox uid until no process of that uid runs (catches children that called ``setsid``) |
| CPU seconds (``cpu_s``) | the kernel: ``RLIMIT_CPU`` (SIGXCPU, then SIGKILL) |
| memory (``memory_mb``) | the kernel: ``RLIMIT_AS`` (allocations fail with MemoryError) |
| processes/threads (``max_procs``) | the kernel: ``RLIMIT_NPROC`` on a throwaway uid (as root; root itself is exempt from it) |
| no network | the kernel: a new, empty network namespace (``unshare``); where that fails, only the audit hook |
| writes only in the temp dir | the kernel for everything the throwaway uid does not own (as root); the audit hook for world-writable places such as ``/tmp``; ``RLIMIT_FSIZE`` caps each file |
| no other programs, no ctypes | the audit hook (``exec``, ``spawn``, ``system``, ``subprocess``, ``ctypes``) |
| environment | the parent passes a fixed minimal environment; ``python -I`` ignores ``PYTHON*`` |
| output size (``max_output_bytes``) | stdout/stderr go to parent-owned files capped by ``RLIMIT_FSIZE``; the parent reads at most that much |

The audit hook is in-process Python: a guard rail, not a security boundary. The kernel limits are
the boundary. Not root and no user namespaces: the process runs as the caller with the rlimits
(``RLIMIT_NPROC`` then counts all of the caller's processes) and the hook; ``capabilities()`` says
what this machine provides.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

_CHILD_SOURCE = (Path(__file__).with_name("_sandbox_child.py")).read_text(encoding="utf-8")
_NET_MARK = "__sandbox_net_isolated__="
_UID_BASE = 200_000
_uid_counter = itertools.count()
_uid_lock = threading.Lock()


@dataclass(frozen=True)
class SandboxLimits:
    """Limits for one run. ``max_procs`` counts threads too; ``max_file_bytes`` caps every file."""

    wall_s: float = 5.0
    cpu_s: int = 2
    memory_mb: int = 512
    max_procs: int = 16
    max_file_bytes: int = 1_000_000
    max_output_bytes: int = 64_000


@dataclass(frozen=True)
class SandboxResult:
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    net_isolated: bool

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def _next_uid() -> int:
    with _uid_lock:
        # pid-derived so concurrent trainer processes are unlikely to share a uid (shared NPROC)
        return _UID_BASE + (os.getpid() * 1009 + next(_uid_counter)) % 1_000_000


def _live_pids(uid: int) -> list[int]:
    """Processes owned by ``uid`` that are not zombies (read from /proc)."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid != uid:
                continue
            with open(f"/proc/{name}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if state != b"Z":
            pids.append(int(name))
    return pids


def _signal_uid(uid: int) -> None:
    """kill(-1, SIGKILL) from a forked helper that became ``uid``: one sweep over every process
    of that uid, including children that left the process group with setsid()."""
    pid = os.fork()
    if pid == 0:  # the forked helper: plain syscalls only, until _exit
        try:
            os.setgid(uid)
            os.setuid(uid)
            os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _kill_uid(uid: int, patience_s: float = 5.0) -> None:
    """Kill every process of the sandbox uid and wait until none is left running."""
    deadline = time.monotonic() + patience_s
    while _live_pids(uid) and time.monotonic() < deadline:
        _signal_uid(uid)
        time.sleep(0.01)


def _read_capped(f, cap: int) -> str:
    f.seek(0)
    return f.read(cap).decode("utf-8", errors="replace")


def run_python(code: str, stdin: str = "", limits: SandboxLimits | None = None) -> SandboxResult:
    """Run ``code`` with ``stdin`` in a fresh temp dir under ``limits``; never raises for the
    program's own failures (they show in ``returncode``/``stderr``)."""
    limits = limits or SandboxLimits()
    root = os.geteuid() == 0
    uid = _next_uid() if root else os.geteuid()
    workdir = tempfile.mkdtemp(prefix="posttrain-sandbox-")
    child_limits = {**asdict(limits), "uid": uid}
    child_limits["max_file_bytes"] = max(limits.max_file_bytes, limits.max_output_bytes)
    proc = None
    timed_out = False
    try:
        Path(workdir, "main.py").write_text(code, encoding="utf-8")
        if root:
            os.chown(workdir, uid, uid)
            os.chown(os.path.join(workdir, "main.py"), uid, uid)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
        with tempfile.TemporaryFile() as fin, tempfile.TemporaryFile() as fout, \
                tempfile.TemporaryFile() as ferr:
            fin.write(stdin.encode("utf-8"))
            fin.seek(0)
            argv = [sys.executable, "-I", "-S", "-B", "-X", "utf8", "-c", _CHILD_SOURCE,
                    workdir, json.dumps(child_limits)]
            proc = subprocess.Popen(argv, stdin=fin, stdout=fout, stderr=ferr, cwd=workdir,
                                    env=env, start_new_session=True, close_fds=True)
            try:
                returncode = proc.wait(timeout=limits.wall_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                returncode = -signal.SIGKILL
            _kill_all(proc, uid if root else None)
            stdout = _read_capped(fout, limits.max_output_bytes)
            stderr = _read_capped(ferr, limits.max_output_bytes)
    finally:
        if proc is not None and proc.poll() is None:
            _kill_all(proc, uid if root else None)
        shutil.rmtree(workdir, ignore_errors=True)
    net_isolated = f"{_NET_MARK}1" in stderr
    stderr = "\n".join(line for line in stderr.splitlines() if not line.startswith(_NET_MARK))
    return SandboxResult(returncode, stdout, stderr, timed_out, net_isolated)


def _kill_all(proc: subprocess.Popen, uid: int | None) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    if uid is not None:
        _kill_uid(uid)


def capabilities() -> dict[str, bool]:
    """What the OS enforces here: ``network_namespace`` and ``uid_drop`` (so RLIMIT_NPROC and
    file permissions apply). Probed by running an empty program."""
    result = run_python("pass", limits=SandboxLimits(wall_s=10.0))
    return {"network_namespace": result.net_isolated, "uid_drop": os.geteuid() == 0 and result.ok}
