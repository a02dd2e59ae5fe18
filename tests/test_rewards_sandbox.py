"""The code sandbox contains what model-written code may try, and code_exec scores with it."""

from __future__ import annotations

import ast
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rewards import load_reward
from rewards.code_exec import extract_code, make_code_exec
from rewards.sandbox import SandboxLimits, capabilities, run_python

FAST = SandboxLimits(wall_s=3.0, cpu_s=1, memory_mb=256, max_procs=8, max_output_bytes=4096)
IS_ROOT = sys.platform == "linux" and os.geteuid() == 0


def kernel_can_unshare_net() -> bool:
    """Probed without rewards.sandbox, so a regression there fails the test instead of skipping."""
    flags = 0x40000000 if IS_ROOT else 0x50000000  # CLONE_NEWNET [| CLONE_NEWUSER]
    probe = f"import ctypes, sys; sys.exit(ctypes.CDLL(None).unshare({flags}) != 0)"
    return subprocess.run([sys.executable, "-c", probe], check=False).returncode == 0


CAN_UNSHARE_NET = sys.platform == "linux" and kernel_can_unshare_net()


def sandbox_pids() -> list[int]:
    """Running (not zombie) processes of a sandbox uid (rewards.sandbox uses 200000 and up)."""
    pids = []
    for entry in Path("/proc").iterdir():
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
        leftovers = sandbox_pids()
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert not leftovers, f"sandbox processes left running: {leftovers}"


def test_runs_code_with_stdin_in_a_writable_temp_dir():
    code = "import os\nopen('f.txt', 'w').write(input()[::-1])\nprint(open('f.txt').read())\n" \
           "print(os.getcwd())"
    result = run_python(code, stdin="abc\n", limits=FAST)
    assert result.ok, result.stderr
    out, cwd = result.stdout.splitlines()
    assert out == "cba" and "posttrain-sandbox-" in cwd
    assert not Path(cwd).exists()  # removed afterwards


def test_environment_is_stripped(monkeypatch):
    monkeypatch.setenv("POSTTRAIN_SECRET_TOKEN", "hunter2")
    result = run_python("import os; print(sorted(os.environ))", limits=FAST)
    assert result.ok, result.stderr
    assert "POSTTRAIN_SECRET_TOKEN" not in result.stdout
    assert set(ast.literal_eval(result.stdout)) <= {"HOME", "LANG", "LC_CTYPE", "PATH", "TMPDIR"}


def test_infinite_loop_is_stopped_by_the_cpu_limit(no_leftovers):
    start = time.perf_counter()
    result = run_python("while True:\n    pass\n", limits=FAST)
    assert time.perf_counter() - start < 2.5
    assert not result.ok and result.returncode == -signal.SIGXCPU


def test_sleeping_forever_is_stopped_by_the_wall_clock(no_leftovers):
    start = time.perf_counter()
    result = run_python("import time\ntime.sleep(60)\n",
                        limits=SandboxLimits(wall_s=0.5, cpu_s=1))
    assert time.perf_counter() - start < 1.5
    assert result.timed_out and not result.ok


def test_large_allocation_fails_inside(no_leftovers):
    result = run_python("x = bytearray(2 * 1024 ** 3)\nprint('allocated')\n", limits=FAST)
    assert not result.ok and "MemoryError" in result.stderr and "allocated" not in result.stdout


@pytest.mark.skipif(not IS_ROOT, reason="RLIMIT_NPROC is enforced only via the root uid drop")
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
    assert not sandbox_pids()


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


@pytest.mark.skipif(not CAN_UNSHARE_NET, reason="the kernel refuses unshare(CLONE_NEWNET) here")
def test_network_is_cut_by_the_kernel_not_only_the_hook():
    assert capabilities()["network_namespace"]
    result = run_python("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n",
                        limits=FAST)
    assert result.net_isolated and "Network is unreachable" in result.stderr


def test_writes_outside_the_temp_dir_fail(tmp_path):
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
    result = run_python("import subprocess; subprocess.run(['touch', '/tmp/x'])", limits=FAST)
    assert not result.ok and "not allowed" in result.stderr


def test_output_is_capped():
    result = run_python("while True:\n    print('x' * 1000)\n", limits=FAST)
    assert not result.ok and len(result.stdout) <= FAST.max_output_bytes


# ---- code_exec ----------------------------------------------------------------------------------

def test_extract_code_takes_the_last_fenced_block():
    text = "try\n```python\nprint(1)\n```\nbetter:\n```python\nprint(2)\n```\n"
    assert extract_code(text) == "print(2)\n"
    assert extract_code("print(3)") == "print(3)"


def test_code_exec_scores_the_fraction_of_tests_passed(no_leftovers):
    reward = make_code_exec(wall_s=3.0, cpu_s=1, memory_mb=256)
    adder = "```python\ndef add(a, b):\n    return a + b\nif __name__ == '__main__':\n" \
            "    print(sum(map(int, input().split())))\n```"
    io_tests = [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5", "output": "10"},
                {"input": "1 1", "output": "3"}]
    assert_tests = ["assert add(2, 3) == 5", "assert add('a', 'b') == 'ab'", "assert add(1, 1) == 3"]
    function_only = "def add(a, b):\n    return a + b\n"
    scores = reward(["p"] * 4, [adder, function_only, "while True: pass", adder],
                    tests=[io_tests, assert_tests, ["assert True"], None])
    assert scores == [pytest.approx(2 / 3), pytest.approx(2 / 3), 0.0, None]
    assert reward(["p"], [adder]) == [None]
    assert reward(["p"], [function_only], tests=['["assert add(1, 2) == 3"]']) == [1.0]
    assert load_reward("code_exec(column='cases', cpu_s=1)")(
        ["p"], [adder], cases=[[{"input": "2 2", "output": "4"}]]) == [1.0]
