"""The code sandbox contains what model-written code may try: limits, and (with a sandboxing
tool) isolation from the machine and from other samples."""

from __future__ import annotations

import ast
import os
import signal
import socket
import sys
import time
import uuid
from pathlib import Path

import pytest

from rewards.sandbox import SandboxLimits, Session, capabilities, run_python, sandbox_tool

FAST = SandboxLimits(wall_s=3.0, cpu_s=1, memory_mb=256, max_procs=8, max_output_bytes=4096)
IS_ROOT = sys.platform == "linux" and os.geteuid() == 0
TOOL = sandbox_tool()
strong = pytest.mark.skipif(not TOOL.strong, reason=f"no sandboxing tool: {TOOL.summary}")


def sandbox_pids() -> list[int]:
    """Running (not zombie) processes of a sandbox uid (rewards.sandbox uses 200000 and up)."""
    pids = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        try:
            if not entry.name.isdigit() or not 200_000 <= entry.stat().st_uid < 1_200_000:
                continue
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                pids.append(int(entry.name))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return pids


@pytest.fixture
def no_leftovers():
    """Fails a test that leaves a sandbox process running, and kills it whatever happens."""
    try:
        yield
    finally:
        time.sleep(0.05)
        leftovers = sandbox_pids()
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert not leftovers, f"sandbox processes left running: {leftovers}"


# ---- limits (every mode) --------------------------------------------------------------------

def test_runs_code_with_stdin_in_a_writable_work_dir():
    code = "import os\nopen('f.txt', 'w').write(input()[::-1])\nprint(open('f.txt').read())\n" \
           "print(os.getcwd())"
    result = run_python(code, stdin="abc\n", limits=FAST)
    assert result.ok, result.stderr
    out, cwd = result.stdout.splitlines()
    assert out == "cba"
    assert not Path(cwd).exists() or cwd == "/sandbox"  # a host temp dir is removed afterwards


def test_environment_is_stripped(monkeypatch):
    monkeypatch.setenv("POSTTRAIN_SECRET_TOKEN", "hunter2")
    result = run_python("import os; print(sorted(os.environ))", limits=FAST)
    assert result.ok, result.stderr
    assert "POSTTRAIN_SECRET_TOKEN" not in result.stdout
    assert set(ast.literal_eval(result.stdout)) <= {"HOME", "LANG", "LC_CTYPE", "PATH", "PWD", "TMPDIR"}


def test_infinite_loop_is_stopped_by_the_cpu_limit(no_leftovers):
    # a generous wall clock, so on a busy machine it is the CPU limit that stops the loop
    limits = SandboxLimits(wall_s=60, cpu_s=FAST.cpu_s)
    result = run_python("while True:\n    pass\n", limits=limits)
    assert not result.ok and result.returncode == -signal.SIGXCPU and not result.timed_out


def test_sleeping_forever_is_stopped_by_the_wall_clock(no_leftovers):
    start = time.perf_counter()
    result = run_python("import time\ntime.sleep(60)\n",
                        limits=SandboxLimits(wall_s=0.5, cpu_s=1))
    assert time.perf_counter() - start < 1.5
    assert result.timed_out and not result.ok


def test_large_allocation_fails_inside(no_leftovers):
    result = run_python("x = bytearray(2 * 1024 ** 3)\nprint('allocated')\n", limits=FAST)
    assert not result.ok and "MemoryError" in result.stderr and "allocated" not in result.stdout


@pytest.mark.skipif(not (IS_ROOT or TOOL.mode == "bwrap"),
                    reason="RLIMIT_NPROC needs a uid of its own (root, or bubblewrap)")
@pytest.mark.parametrize("bomb", [
    "import os\nwhile True:\n    os.fork()\n",
    "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
])
def test_fork_bomb_is_contained(bomb, no_leftovers):
    limits = SandboxLimits(wall_s=1.5, cpu_s=1, memory_mb=128, max_procs=8)
    start = time.perf_counter()
    result = run_python(bomb, limits=limits)
    assert time.perf_counter() - start < 4.0
    assert not result.ok


def test_output_is_capped():
    result = run_python("while True:\n    print('x' * 1000)\n", limits=FAST)
    assert not result.ok and len(result.stdout) <= FAST.max_output_bytes


def test_bad_limits_are_refused():
    for bad in ({"wall_s": 0}, {"cpu_s": -1}, {"memory_mb": float("nan")},
                {"wall_s": float("inf")}):
        with pytest.raises(ValueError, match="must be a finite number > 0"):
            SandboxLimits(**bad)


def test_network_connect_fails_inside(no_leftovers):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        code = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                "print('connected')\n")
        result = run_python(code, limits=FAST)
        assert not result.ok and "connected" not in result.stdout
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever reached the listener
    finally:
        listener.close()


def test_writes_outside_the_work_dir_fail(tmp_path):
    targets = [tmp_path / "escape.txt", Path("/tmp") / f"escape-{os.getpid()}.txt",
               Path("/dev/shm") / f"escape-{os.getpid()}.txt"]
    for target in targets:
        for how in (f"open({str(target)!r}, 'w').write('x')",
                    f"import os; os.close(os.open({str(target)!r}, os.O_CREAT | os.O_WRONLY))",
                    f"import pathlib; pathlib.Path({str(target)!r}).touch()"):
            result = run_python(how, limits=FAST)
            assert not result.ok and "Error" in result.stderr, how
            assert not target.exists(), how
    (tmp_path / "keep.txt").write_text("keep")
    result = run_python(f"import os; os.remove({str(tmp_path / 'keep.txt')!r})", limits=FAST)
    assert not result.ok and (tmp_path / "keep.txt").exists()
    target = Path("/tmp") / f"escape-{uuid.uuid4().hex}"
    result = run_python(f"import subprocess; subprocess.run(['touch', {str(target)!r}])",
                        limits=FAST)
    assert not result.ok and not target.exists()


# ---- isolation (a sandboxing tool) ---------------------------------------------------------

@strong
def test_capabilities_name_the_tool():
    caps = capabilities()
    assert caps["tool"] == TOOL.mode and caps["strong"] and caps["network_namespace"]


@strong
def test_the_machine_is_invisible_inside(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2")
    probe = ("import os, sys\n"
             f"for p in ['/etc/shadow', '/etc/passwd', {str(secret)!r}, {__file__!r}, '/proc/1/environ',"
             " '/root/.bash_history', '/home']:\n"
             "    try:\n        open(p).read(); print('READ', p)\n"
             "    except OSError:\n        pass\n"
             "print(sorted(os.listdir('/')))\n"
             "print(any('site-packages' in p and os.listdir(p) for p in sys.path if os.path.isdir(p)))\n")
    result = run_python(probe, limits=FAST)
    assert result.ok, result.stderr
    assert "READ" not in result.stdout
    assert "etc" not in result.stdout and "home" not in result.stdout and "tmp" not in result.stdout
    assert result.stdout.strip().endswith("False")  # installed packages are hidden


@strong
def test_samples_do_not_see_one_another():
    marker = uuid.uuid4().hex
    first = Session(FAST)
    try:
        assert first.request("load", code=f"open('/sandbox/notes.txt', 'w').write({marker!r})\n"
                                           "x = 1")["ok"]
        # the first sandbox is still running while the second looks for its files
        snoop = (f"import os\nfound = []\nmarker = {marker[::-1]!r}[::-1]\n"
                 "for root, dirs, files in os.walk('/'):\n"
                 "    for f in files:\n"
                 "        p = os.path.join(root, f)\n"
                 "        try:\n"
                 "            if os.path.isfile(p) and os.path.getsize(p) < 65536 and marker in open(p, errors='ignore').read(): "
                 "found.append(p)\n"
                 "        except OSError:\n            pass\n"
                 "print(found)\n")
        second = run_python(snoop, limits=SandboxLimits(wall_s=20, cpu_s=15))
    finally:
        first.close()
    assert second.ok, second.stderr
    assert second.stdout.strip() == "[]"


@strong
def test_files_do_not_outlive_the_sandbox():
    first = run_python("open('/sandbox/left.txt', 'w').write('x')", limits=FAST)
    assert first.ok
    second = run_python("import os; print(os.listdir('/sandbox'))", limits=FAST)
    assert second.stdout.strip() == "['main.py']"


@strong
def test_work_dir_is_size_capped():
    limits = SandboxLimits(wall_s=5, cpu_s=2, disk_mb=1)
    result = run_python("open('big', 'wb').write(b'x' * (4 << 20))", limits=limits)
    assert not result.ok and ("No space left" in result.stderr or "File too large" in result.stderr)


@strong
def test_unix_sockets_on_the_host_are_unreachable(tmp_path):
    path = tmp_path / "host.sock"
    listeners = []
    for address in (str(path), f"\0posttrain-test-{uuid.uuid4().hex}"):
        s = socket.socket(socket.AF_UNIX)
        s.bind(address)
        s.listen()
        s.setblocking(False)
        listeners.append((s, address))
    try:
        for s, address in listeners:
            code = f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({address!r})\n" \
                   "print('connected')"
            result = run_python(code, limits=FAST)
            assert not result.ok and "connected" not in result.stdout
            with pytest.raises(BlockingIOError):
                s.accept()
    finally:
        for s, _ in listeners:
            s.close()


@strong
def test_no_privileges_and_no_setuid_programs():
    code = ("import ctypes, os\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "print('nnp', libc.prctl(39, 0, 0, 0, 0))\n"  # PR_GET_NO_NEW_PRIVS
            "print('uid', os.getuid())\n"
            "for p in ['/usr/bin/su', '/usr/bin/passwd', '/bin/mount', '/usr/bin/sudo']:\n"
            "    print(p, os.path.exists(p))\n"
            "try:\n    os.setuid(0); print('became root')\nexcept OSError:\n    pass\n"
            "print('mount', libc.mount(b'none', b'/sandbox', b'tmpfs', 0, None))\n")
    result = run_python(code, limits=FAST)
    assert result.ok, result.stderr
    out = result.stdout
    assert "nnp 1" in out and "became root" not in out and "mount -1" in out
    assert "True" not in out  # no setuid binary is even visible
    if IS_ROOT:
        assert "uid 0" not in out


def test_switching_off_the_audit_hook_gains_nothing(tmp_path):
    """Regression: one line (`M._WORKDIR = ''`) switched the weak mode's hook off."""
    target = tmp_path / "escape.txt"
    code = f"import __main__ as M\nM._WORKDIR = ''\nopen({str(target)!r}, 'w').write('x')\n"
    result = run_python(code, limits=FAST)
    assert not result.ok and not target.exists()
