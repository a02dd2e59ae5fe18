"""The first code the sandboxed interpreter runs (sent as ``python -I -S -c <this file's text>``).

It confines its own process before it compiles the untrusted program, in this order:

1. ``unshare(CLONE_NEWNET)`` (root) or ``unshare(CLONE_NEWUSER | CLONE_NEWNET)`` (other users):
   a new network namespace with only a downed loopback, so every connect fails in the kernel.
2. ``setrlimit``: CPU seconds, address space, process count, file size, open files, no core dumps.
3. As root: drop to a throwaway uid/gid with no supplementary groups, keeping only
   ``CAP_DAC_READ_SEARCH`` (the interpreter's stdlib may live under an unreadable ``/root``).
   Writes are then checked by the kernel against that uid, and ``RLIMIT_NPROC`` applies (root is
   exempt from it), so a fork bomb stops at the limit.
4. A ``sys.addaudithook`` hook that refuses writes and filesystem mutations outside the temp dir,
   ``exec``/``spawn`` of other programs, ``ctypes``, and (only where step 1 failed) sockets.
   The hook is a guard rail, not a security boundary: it is in-process Python.

Argv: ``[-c, workdir, limits_json]``. The program is ``workdir/main.py``. The package never
imports this module (importing it does nothing); ``rewards.sandbox`` reads it as text.
"""

import ctypes
import json
import os
import resource
import sys

_WORKDIR = ""  # set from argv when run as the sandbox's __main__
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_PATH_EVENTS = {
    "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1),
    "os.chmod": (0,), "os.chown": (0,), "os.symlink": (0, 1), "os.link": (0, 1),
    "os.truncate": (0,), "os.utime": (0,), "os.setxattr": (0,), "os.removexattr": (0,),
    "shutil.rmtree": (0,), "shutil.move": (0, 1), "shutil.copyfile": (1,),
}
_BLOCKED_PREFIXES = ("os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.",
                     "ctypes.", "os.fork_exec", "_posixsubprocess")
_SOCKET_EVENTS = ("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
                  "socket.getaddrinfo", "socket.gethostbyname")


def _confine(limits: dict) -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    root = os.geteuid() == 0
    flags = 0x40000000 if root else 0x10000000 | 0x40000000  # CLONE_NEWNET [| CLONE_NEWUSER]
    net_isolated = libc.unshare(flags) == 0
    mb = 1024 * 1024
    for which, value in ((resource.RLIMIT_CPU, limits["cpu_s"]),
                         (resource.RLIMIT_AS, limits["memory_mb"] * mb),
                         (resource.RLIMIT_NPROC, limits["max_procs"]),
                         (resource.RLIMIT_FSIZE, limits["max_file_bytes"]),
                         (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)):
        hard = value + 1 if which == resource.RLIMIT_CPU else value
        resource.setrlimit(which, (value, hard))
    if root:
        uid = limits["uid"]
        libc.prctl(8, 1, 0, 0, 0)  # PR_SET_KEEPCAPS: keep the permitted set across setuid
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)

        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

        class Data(ctypes.Structure):
            _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                        ("inheritable", ctypes.c_uint32)]

        data = (Data * 2)()
        data[0].effective = data[0].permitted = 1 << 2  # CAP_DAC_READ_SEARCH only
        if libc.capset(ctypes.byref(Header(0x20080522, 0)), data) != 0:
            os._exit(97)  # refuse to run with an unknown capability set
    return net_isolated


def _inside(path) -> bool:
    if isinstance(path, int):
        return True  # an already-open descriptor was checked when it was opened
    try:
        real = os.path.realpath(os.fsdecode(path))
    except (TypeError, ValueError):
        return False
    return real == _WORKDIR or real.startswith(_WORKDIR + os.sep) or real == "/dev/null"


def _make_hook(net_isolated: bool):
    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = (mode is not None and any(c in mode for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & _WRITE_FLAGS)
            if writing and path is not None and not _inside(path):
                raise PermissionError(f"sandbox: writing outside the work dir: {path!r}")
        elif event in _PATH_EVENTS:
            for i in _PATH_EVENTS[event]:
                if i < len(args) and args[i] is not None and not _inside(args[i]):
                    raise PermissionError(f"sandbox: {event} outside the work dir: {args[i]!r}")
        elif event.startswith(_BLOCKED_PREFIXES) or (event == "import" and args[0] in (
                "ctypes", "_ctypes", "subprocess", "_posixsubprocess")):
            raise PermissionError(f"sandbox: {event} is not allowed")
        elif not net_isolated and event in _SOCKET_EVENTS:
            raise PermissionError(f"sandbox: network is not allowed ({event})")
    return hook


def _main() -> None:
    global _WORKDIR
    _WORKDIR = os.path.realpath(sys.argv[1])
    net_isolated = _confine(json.loads(sys.argv[2]))
    os.chdir(_WORKDIR)
    with open(os.path.join(_WORKDIR, "main.py"), encoding="utf-8") as f:
        source = f.read()
    for name in ("ctypes", "ctypes._endian", "_ctypes", "resource"):
        sys.modules.pop(name, None)
    sys.argv = ["main.py"]
    sys.path[:0] = [_WORKDIR]
    sys.stderr.write(f"__sandbox_net_isolated__={int(net_isolated)}\n")
    sys.stderr.flush()
    sys.addaudithook(_make_hook(net_isolated))
    code = compile(source, "main.py", "exec")
    globals_ = {"__name__": "__main__", "__builtins__": __builtins__}
    del globals()["_main"]
    exec(code, globals_)  # noqa: S102 - running the program is the point


if __name__ == "__main__":  # `python -c <source>` runs as __main__; importing this does nothing
    _main()
