"""Run model-written Python in a sandbox, and talk to it over a channel it cannot fake.

A :class:`Session` starts one sandboxed worker (``rewards/_sandbox_child.py``) for one run of a
program: ``load`` the program, then ``exec`` / ``eval`` test code in its namespace, then
``close``. Requests and replies travel over a socket whose other end this process holds,
outside the sandbox; the program's stdout and stderr go to files this process reads, capped.
What confines the worker, and who enforces it:

| limit | enforced by |
|---|---|
| files it can read: the interpreter, its stdlib, system libraries; nothing else | bubblewrap's mount namespace (Linux) / the Seatbelt profile (macOS) |
| writes only in a private work dir, size-capped | a tmpfs of ``disk_mb`` (Linux) / the profile + ``RLIMIT_FSIZE`` (macOS) |
| no network, no Unix sockets to the host | a new network namespace, no host ``/tmp`` (Linux) / the profile (macOS) |
| no other processes, no IPC, no setuid elevation | pid + ipc namespaces, ``no_new_privs``, ``nosuid`` mounts, no capabilities |
| wall clock (``wall_s``) | this process: a deadline on every reply, then SIGKILL (the pid namespace dies with it) |
| CPU seconds, memory, processes, file size | the kernel's rlimits, set by the worker before the program runs |
| environment | a fixed minimal one; ``python -I`` ignores ``PYTHON*`` |

Each session is a fresh sandbox (own tmpfs, own namespaces), so samples never see one another.
As root the worker runs as a throwaway uid (``RLIMIT_NPROC`` then stops fork bombs).

Without a sandboxing tool (no ``bwrap`` / ``sandbox-exec``, or one that fails its probe, e.g. no
user namespaces for a non-root user), code is refused unless the user accepts the weaker guard
(:func:`require_sandbox`): rlimits, a throwaway uid and a network namespace where possible, and
an in-process audit hook -- a guard rail, not a boundary. ``POSTTRAIN_SANDBOX=none`` forces that
path (to test it, or to check what a machine without the tool does).
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import sandbox_launch
from .contract import RewardError
from .sandbox_launch import kill_all

_CHILD_SOURCE = Path(__file__).with_name("_sandbox_child.py").read_text(encoding="utf-8")
_UID_BASE = 200_000
_uid_counter = itertools.count()
_lock = threading.Lock()
_tool: SandboxTool | None = None
_announced = False
STARTUP_S = 30.0
MAX_REPLY_BYTES = 4 << 20
TOOL_ENV = "POSTTRAIN_SANDBOX"


class SandboxError(RewardError):
    """The sandbox itself failed (not the program in it): a setup problem to report, not a 0."""


@dataclass(frozen=True)
class SandboxLimits:
    """Limits for one run. ``max_procs`` counts threads too; ``max_file_bytes`` caps every file;
    ``disk_mb`` caps the work dir (a tmpfs under bubblewrap)."""

    wall_s: float = 5.0
    cpu_s: int = 2
    memory_mb: int = 512
    max_procs: int = 16
    max_file_bytes: int = 1_000_000
    max_output_bytes: int = 64_000
    disk_mb: int = 64

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 \
                    or value == float("inf"):
                raise ValueError(f"sandbox limit {name}={value!r}: must be a finite number > 0")


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


@dataclass(frozen=True)
class SandboxTool:
    """``mode``: ``bwrap``, ``seatbelt`` or ``weak`` (no tool); ``summary``: one line saying what
    confines the code, or why no tool works here."""

    mode: str
    summary: str

    @property
    def strong(self) -> bool:
        return self.mode != "weak"


def _next_uid() -> int:
    with _lock:
        # pid-derived so concurrent trainer processes are unlikely to share a uid (shared NPROC)
        return _UID_BASE + (os.getpid() * 1009 + next(_uid_counter)) % 1_000_000


class Session:
    """One sandboxed worker. ``request(op, ...)`` returns the worker's reply (a dict with ``ok``)
    or None once the worker is gone, timed out or broke the protocol."""

    def __init__(self, limits: SandboxLimits, stdin: str = "", tool: SandboxTool | None = None):
        self.limits = limits
        self.tool = tool or sandbox_tool()
        self.timed_out = self.broken = self.gone = False
        self.net_isolated = False
        root = os.geteuid() == 0
        self.uid = _next_uid() if root and self.tool.mode in ("bwrap", "weak") else None
        self._host_workdir = None
        if self.tool.mode == "bwrap":
            workdir = sandbox_launch.WORKDIR_IN_SANDBOX
        else:
            self._host_workdir = workdir = os.path.realpath(
                tempfile.mkdtemp(prefix="posttrain-sandbox-"))
            if self.uid is not None:
                os.chown(workdir, self.uid, self.uid)
        self._files = [tempfile.TemporaryFile() for _ in range(3)]  # noqa: SIM115 (closed in _cleanup)
        self._files[0].write(stdin.encode("utf-8"))
        self._files[0].seek(0)
        self._sock, child = socket.socketpair()
        self._buffer = b""
        nonce = secrets.token_hex(16)
        file_cap = max(limits.max_file_bytes, limits.max_output_bytes)
        config = {"mode": self.tool.mode, "fd": child.fileno(), "workdir": workdir,
                  "uid": self.uid, "nonce": nonce,
                  "limits": {**asdict(limits), "max_file_bytes": file_cap}}
        worker = [sandbox_launch.interpreter(), "-I", "-S", "-B", "-X", "utf8", "-c",
                  _CHILD_SOURCE, json.dumps(config)]
        argv = _command(self.tool, worker, limits, root, workdir)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
        try:
            self.proc = subprocess.Popen(
                argv, stdin=self._files[0], stdout=self._files[1], stderr=self._files[2],
                pass_fds=(child.fileno(),), cwd=self._host_workdir or "/", env=env,
                start_new_session=True, umask=0o022)
        except OSError as e:
            self._cleanup()
            raise SandboxError(f"code_exec: cannot start the sandbox ({argv[0]}): {e}") from None
        finally:
            child.close()
        self.deadline = time.monotonic() + STARTUP_S
        hello = self._receive()
        if not hello or hello.get("ready") != nonce:
            result = self.close()
            tail = " | ".join(result.stderr.strip().splitlines()[-3:]) or "no output"
            raise SandboxError("code_exec: the sandbox worker did not start"
                               f" ({self.tool.mode}): {tail}")
        self.net_isolated = bool(hello.get("net_isolated"))
        self.deadline = time.monotonic() + limits.wall_s

    def request(self, op: str, **fields) -> dict | None:
        if self.broken:
            return None
        rid = secrets.token_hex(8)
        try:
            self._sock.sendall((json.dumps({"op": op, "id": rid, **fields}) + "\n").encode())
        except OSError:
            self.broken = True
            return None
        reply = self._receive()
        if reply is None or reply.get("id") != rid or not isinstance(reply.get("ok"), bool):
            self.broken = True
            return None
        return reply

    def _receive(self) -> dict | None:
        while b"\n" not in self._buffer:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                self.timed_out = True
                return None
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(1 << 16)
            except TimeoutError:
                self.timed_out = True
                return None
            except OSError:
                self.gone = True
                return None
            if not chunk:
                self.gone = True
                return None
            if len(self._buffer) + len(chunk) > MAX_REPLY_BYTES:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            message = json.loads(line)
        except ValueError:
            return None
        return message if isinstance(message, dict) else None

    def close(self) -> SandboxResult:
        """End the worker (politely, then SIGKILL) and collect its output."""
        if self.proc.poll() is None and (self.gone or not (self.broken or self.timed_out)):
            try:  # a worker that is gone only needs reaping; one that broke the protocol, killing
                if not self.gone:
                    self._sock.sendall(b'{"op": "exit", "id": ""}\n')
                self.proc.wait(timeout=2.0)
            except (OSError, subprocess.TimeoutExpired):
                pass
        killed = self.proc.poll() is None
        kill_all(self.proc, self.uid if (killed or self.tool.mode == "weak") else None)
        code = self.proc.returncode
        if self.tool.mode == "bwrap" and code > 128:  # bwrap reports a signal as 128 + signo
            code = -(code - 128)
        cap = self.limits.max_output_bytes
        stdout, stderr = (_read_capped(f, cap) for f in self._files[1:])
        self._cleanup()
        return SandboxResult(code, stdout, stderr, self.timed_out, self.net_isolated)

    def _cleanup(self) -> None:
        self._sock.close()
        for f in self._files:
            f.close()
        if self._host_workdir:
            shutil.rmtree(self._host_workdir, ignore_errors=True)


def _command(tool: SandboxTool, worker: list[str], limits: SandboxLimits, root: bool,
             workdir: str) -> list[str]:
    if tool.mode == "bwrap":
        return sandbox_launch.bwrap_command(shutil.which("bwrap") or "bwrap", worker,
                                           limits.disk_mb << 20, root)
    if tool.mode == "seatbelt":
        return ["/usr/bin/sandbox-exec", "-p", sandbox_launch.seatbelt_profile(workdir), *worker]
    return worker


def run_python(code: str, stdin: str = "", limits: SandboxLimits | None = None) -> SandboxResult:
    """Run ``code`` with ``stdin`` in a fresh sandbox; ``returncode`` 0 when it ran to the end
    (or exited with 0), 1 when it raised or exited otherwise, ``-signal`` when it was killed."""
    session = Session(limits or SandboxLimits(), stdin)
    reply = session.request("load", code=code)
    result = session.close()
    if result.returncode < 0:  # killed (a limit, the wall clock, or itself)
        code_ = result.returncode
    elif reply is None:  # gone without the worker seeing the program end: never a success
        code_ = result.returncode or 1
    else:
        code_ = 0 if reply["ok"] else 1
    return SandboxResult(code_, result.stdout, result.stderr, result.timed_out,
                         result.net_isolated)


# ---- which tool ------------------------------------------------------------------------------

def _probe(mode: str) -> str | None:
    """None when a trivial program runs under ``mode``; else why not."""
    try:
        session = Session(SandboxLimits(wall_s=20.0), tool=SandboxTool(mode, ""))
    except SandboxError as e:
        return str(e).split(": ", 1)[-1]
    reply = session.request("load", code="print(6 * 7)")
    result = session.close()
    if reply is None or not reply["ok"] or result.stdout.strip() != "42":
        return f"a test program failed: {result.stderr.strip()[-300:] or 'no output'}"
    return None


def _detect() -> SandboxTool:
    forced = os.environ.get(TOOL_ENV, "auto")
    if forced == "none":
        return SandboxTool("weak", f"no sandboxing tool ({TOOL_ENV}=none)")
    if sys.platform.startswith("linux"):
        bwrap = shutil.which("bwrap")
        if bwrap is None:
            return SandboxTool("weak", "bubblewrap is not installed (apt-get install bubblewrap, "
                                       "or run scripts/install.sh)")
        why = _probe("bwrap")
        if why is None:
            version = subprocess.run([bwrap, "--version"], capture_output=True, text=True,
                                     check=False).stdout.strip() or "bubblewrap"
            who = "a throwaway uid" if os.geteuid() == 0 else "this user in a user namespace"
            return SandboxTool("bwrap", f"{version}: own mount/pid/ipc/net/uts namespaces, "
                               "read-only interpreter and libraries, private tmpfs, no "
                               f"capabilities, no_new_privs, as {who}")
        return SandboxTool("weak", f"bubblewrap cannot create a sandbox here: {why}")
    if sys.platform == "darwin":
        if not os.path.exists("/usr/bin/sandbox-exec"):
            return SandboxTool("weak", "/usr/bin/sandbox-exec is missing")
        why = _probe("seatbelt")
        if why is None:
            return SandboxTool("seatbelt", "sandbox-exec (Seatbelt): deny-by-default profile, "
                               "read-only interpreter and system libraries, writes only in a "
                               "private temp dir, no network")
        return SandboxTool("weak", f"sandbox-exec cannot create a sandbox here: {why}")
    return SandboxTool("weak", f"no sandboxing tool is supported on {sys.platform}")


def sandbox_tool() -> SandboxTool:
    """The tool confining code on this machine (probed once per process)."""
    global _tool
    with _lock:
        cached = _tool
    if cached is None:
        cached = _detect()
        with _lock:
            _tool = cached
    return cached


def require_sandbox(allow_weak: bool = False) -> SandboxTool:
    """The tool to run model-written code with, said once on stderr; a :class:`SandboxError`
    when no tool works here and the weaker guard was not accepted."""
    global _announced
    tool = sandbox_tool()
    if not tool.strong and not allow_weak:
        raise SandboxError(
            f"code_exec: refusing to run model-written code: {tool.summary}. Without a "
            "sandboxing tool it would run under rlimits, a throwaway uid and an in-process "
            "audit hook only; pass --allow-weak-sandbox (or code_exec(allow_weak_sandbox=True)) "
            "to accept that weaker guard")
    with _lock:
        first, _announced = not _announced, True
    if first:
        if tool.strong:
            print(f"code_exec: sandbox: {tool.summary}", file=sys.stderr)
        else:
            print(f"code_exec: WARNING: weak sandbox: {tool.summary}; model-written code runs "
                  "under rlimits, a throwaway uid (as root), a network namespace where the "
                  "kernel allows it and an audit hook (accepted with --allow-weak-sandbox)",
                  file=sys.stderr)
    return tool


def capabilities() -> dict[str, bool | str]:
    """What confines code here: the ``tool`` mode, and whether the network is cut."""
    tool = sandbox_tool()
    result = run_python("pass", limits=SandboxLimits(wall_s=20.0))
    return {"tool": tool.mode, "strong": tool.strong, "network_namespace": result.net_isolated,
            "uid_drop": os.geteuid() == 0 and result.ok}


def _read_capped(f, cap: int) -> str:
    f.seek(0)
    return f.read(cap).decode("utf-8", errors="replace")
