"""Starting and stopping the sandbox worker: its command line under each sandboxing tool, and
the sweep that kills whatever it leaves behind.

- Linux: bubblewrap (``bwrap``, Debian package ``bubblewrap``, installed by
  ``scripts/install.sh``): new mount, pid, ipc, network, uts (and cgroup) namespaces; a root
  that holds only the interpreter, its standard library (``site-packages`` masked) and the
  system's shared-library dirs, all read-only and ``nosuid``; a private size-capped tmpfs as the
  only writable place (``/sandbox``, also the cwd, ``HOME`` and ``TMPDIR``); a fresh ``/dev``
  with only the null/zero/random/tty nodes; no ``/proc``, ``/etc``, ``/tmp`` or ``/home``; every
  capability dropped (as root: all but setuid/setgid, which the worker uses once to become a
  throwaway uid before program code runs), ``no_new_privs`` (setuid binaries do not elevate), a
  new session (no terminal injection), killed with its parent.
- macOS: ``sandbox-exec`` with the profile from :func:`seatbelt_profile` (deny by default; read
  the interpreter and system libraries; write only the work dir; no network; exec only the
  interpreter).
- Neither: the worker confines itself (``weak`` mode, see ``rewards/_sandbox_child.py``); only
  with the user's explicit consent (``rewards.sandbox.require_sandbox``).
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

WORKDIR_IN_SANDBOX = "/sandbox"
_NAMESPACES = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
               "--unshare-cgroup-try"]


def interpreter() -> str:
    """The real interpreter binary (a venv's ``python`` is a link to it)."""
    return os.path.realpath(sys.executable)


def _library_dirs() -> list[str]:
    """The system's shared-library dirs (libc, libssl... that the interpreter links)."""
    arch = sysconfig.get_config_var("MULTIARCH") or ""
    candidates = [f"/lib/{arch}", f"/usr/lib/{arch}"] if arch else []
    candidates += ["/lib64", "/usr/lib64"]
    found = {os.path.realpath(p) for p in candidates if os.path.isdir(p)}
    if not any(glob.glob(f"{d}/libc.so*") for d in found):
        found |= {os.path.realpath(p) for p in ("/lib", "/usr/lib") if os.path.isdir(p)}
    return sorted(found)


def _python_files() -> tuple[list[str], list[str]]:
    """(dirs, files) of the interpreter: its standard library and shared libpython."""
    paths = sysconfig.get_paths()
    dirs = sorted({os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib")})
    files = [interpreter()]
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    if sysconfig.get_config_var("Py_ENABLE_SHARED") and libdir:
        files += sorted(glob.glob(os.path.join(libdir, "libpython*.so*")))
    return dirs, files


def _masked(dirs: list[str]) -> list[str]:
    """``site-packages`` dirs inside the mounted trees: hidden (installed packages and the
    project's own source are not the program's business)."""
    paths = sysconfig.get_paths()
    masked = {os.path.realpath(paths[k]) for k in ("purelib", "platlib")}
    return sorted(m for m in masked
                  if os.path.isdir(m) and any(m.startswith(d + os.sep) for d in dirs))


def _ancestors(path: str) -> list[str]:
    parts = Path(path).parts[1:-1]
    return ["/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1)]


def bwrap_command(bwrap: str, worker: list[str], disk_bytes: int, as_root: bool) -> list[str]:
    """``bwrap ... -- <worker>`` (see the module docstring for what each part enforces)."""
    args = [bwrap, *_NAMESPACES, "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
    if as_root:  # the worker drops to a throwaway uid (then RLIMIT_NPROC applies) and no caps
        args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args += ["--unshare-user"]
    py_dirs, py_files = _python_files()
    lib_dirs = _library_dirs()
    mounts = [(d, d) for d in [*lib_dirs, *py_dirs]]

    def visible(path: str) -> bool:  # inside a directory that is mounted anyway
        return any(path == d or path.startswith(d + os.sep) for d, _ in mounts)

    links = []
    for f in py_files:
        real = os.path.realpath(f)
        if not visible(real):
            mounts.append((real, real))
        if real != f and os.path.islink(f) and not visible(f):
            links.append((os.readlink(f), f))
    for p in ("/lib", "/lib64", "/usr/lib64"):
        if os.path.islink(p):
            links.append((os.readlink(p), p))
    made: set[str] = set()
    for _, dest in mounts + [(None, link) for _, link in links]:
        for parent in _ancestors(dest):
            if parent not in made and not any(parent == m or parent.startswith(m + os.sep)
                                              for _, m in mounts):
                made.add(parent)
                args += ["--perms", "0755", "--dir", parent]
    for src, dest in mounts:
        args += ["--ro-bind", src, dest]
    for target, link in links:
        if not any(link == m for _, m in mounts):
            args += ["--symlink", target, link]
    for hidden in _masked(py_dirs + lib_dirs):
        args += ["--size", "4096", "--tmpfs", hidden, "--remount-ro", hidden]
    args += ["--dev", "/dev", "--remount-ro", "/dev",  # device nodes still work; no /dev/shm
             "--size", str(disk_bytes), "--tmpfs", WORKDIR_IN_SANDBOX,
             "--chmod", "0777", WORKDIR_IN_SANDBOX, "--remount-ro", "/",
             "--chdir", WORKDIR_IN_SANDBOX, "--clearenv",
             "--setenv", "HOME", WORKDIR_IN_SANDBOX, "--setenv", "TMPDIR", WORKDIR_IN_SANDBOX,
             "--setenv", "LANG", "C.UTF-8", "--setenv", "PATH", "/usr/bin:/bin", "--", *worker]
    return args


def _sb_quote(path: str) -> str:
    return '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'


def seatbelt_profile(workdir: str) -> str:
    """A ``sandbox-exec`` (Seatbelt) profile: deny by default; read the interpreter, its
    standard library and the system libraries; read and write only ``workdir``; no network;
    exec only the interpreter; signals only to itself."""
    py_dirs, py_files = _python_files()
    reads = [f"(subpath {_sb_quote(d)})" for d in py_dirs]
    reads += [f"(literal {_sb_quote(os.path.realpath(f))})" for f in py_files]
    reads += [f"(subpath {_sb_quote(os.path.realpath(sys.base_prefix))})",  # framework builds
              '(subpath "/usr/lib")', '(subpath "/System")', '(subpath "/Library/Apple")',
              '(subpath "/private/var/db/dyld")',
              '(literal "/dev/null")', '(literal "/dev/urandom")', '(literal "/dev/random")',
              '(subpath "/private/var/db/timezone")', '(literal "/private/etc/localtime")']
    hidden = "".join(f"\n(deny file-read* (subpath {_sb_quote(m)}))" for m in _masked(py_dirs))
    work = _sb_quote(os.path.realpath(workdir))
    return f"""(version 1)
(deny default)
(allow process-fork)
(allow process-exec (literal {_sb_quote(interpreter())}))
(allow signal (target self))
(allow sysctl-read)
(allow file-read-metadata)
(allow file-read* {' '.join(reads)} (subpath {work})){hidden}
(allow file-write* (subpath {work}) (literal "/dev/null"))
(allow file-ioctl (literal "/dev/null"))
(deny network*)
"""


# --- stopping ---------------------------------------------------------------------------------
def _live_pids(uid: int) -> list[int]:
    """Processes owned by ``uid`` that are not zombies (read from /proc)."""
    pids = []
    for name in os.listdir("/proc") if os.path.isdir("/proc") else []:
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


def kill_all(proc: subprocess.Popen, uid: int | None, patience_s: float = 5.0) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    if uid is None:
        return
    deadline = time.monotonic() + patience_s
    while _live_pids(uid) and time.monotonic() < deadline:
        _signal_uid(uid)
        time.sleep(0.01)
