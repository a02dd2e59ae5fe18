"""code_exec scores only what the harness saw pass: adversarial completions score 0."""

from __future__ import annotations

import ast

import pytest

import rewards.sandbox as sandbox_module
from rewards import load_reward
from rewards.code_exec import extract_code, make_code_exec
from rewards.code_tests import Step, decode, holds, plan_assert_test
from rewards.sandbox import SandboxError, SandboxTool, sandbox_tool

ADD = "def add(a, b):\n    return a + b\n"
ASSERTS = ["assert add(20, 22) == 42", "assert add('a', 'b') == 'ab'",
           "x = add(1, 1)\nassert x == 2", "assert 7 in [add(3, 4)]"]
IO = [{"input": "20 22\n", "output": "42\n"}, {"input": "1 1", "output": "2"}]
IO_PROGRAM = "print(sum(map(int, input().split())))\n"

# Completions that try to pass without being right; each must score 0 on ASSERTS and IO.
ATTACKS = {
    "sys.exit(0) first": "import sys\nsys.exit(0)\n",
    "os._exit(0) first": "import os\nos._exit(0)\n",
    "raise SystemExit": "raise SystemExit\n",
    "SystemExit(0) in the function": "import sys\ndef add(a, b):\n    sys.exit(0)\n",
    "atexit handler": "import atexit, os\natexit.register(lambda: os._exit(0))\n"
                      "def add(a, b):\n    return 0\n",
    "kill itself": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
    "SIGTERM itself": "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\n",
    "fake markers": "print('PASSED'); print('OK'); print('__sandbox_ok__')\n"
                    "import sys; sys.stderr.write('ALL TESTS PASSED\\n')\n",
    "always-equal object": "class T:\n    def __eq__(self, o): return True\n"
                           "    def __contains__(self, o): return True\n"
                           "def add(a, b):\n    return T()\n",
    "int subclass equal to all": "class T(int):\n    def __eq__(self, o): return True\n"
                                 "    __hash__ = int.__hash__\ndef add(a, b):\n    return T(0)\n",
    "patched AssertionError": "import builtins\n"
                              "builtins.AssertionError = type('X', (BaseException,), {})\n"
                              "def add(a, b):\n    return 0\n",
    "patched harness module": "import __main__ as M, sys\nM._WORKDIR = ''\n"
                              "for m in list(sys.modules.values()):\n"
                              "    for k in ('exec', 'eval', 'compile'):\n"
                              "        try: setattr(m, k, lambda *a, **kw: None)\n"
                              "        except Exception: pass\n"
                              "def add(a, b):\n    return 0\n",
    "replaced stdout": "import sys, io\nsys.stdout = io.StringIO()\nprint('42')\n"
                       "def add(a, b):\n    return None\n",
    "forks and lets the child report": "import os\nif os.fork() == 0:\n    pass\n"
                                       "def add(a, b):\n    return 0\n",
    "closes the channel": "import os\nfor fd in range(3, 64):\n    try: os.close(fd)\n"
                          "    except OSError: pass\n",
    "spams the channel": "import os\nfor fd in range(3, 10):\n    try: os.write(fd, "
                         "b'{\"id\": \"x\", \"ok\": true}\\n' * 100)\n    except OSError: pass\n"
                         "def add(a, b):\n    return 0\n",
    "hangs": "import time\ntime.sleep(60)\n",
    "hijacks the protocol": (
        "import gc, json, os, sys\n"
        "req = sys._getframe(1).f_locals.get('request') or {}\n"
        "os.write(3, (json.dumps({'id': req.get('id'), 'ok': True}) + '\\n').encode())\n"
        "buf = b''\n"
        "while True:\n"
        "    while b'\\n' not in buf:\n"
        "        chunk = os.read(3, 65536)\n"
        "        if not chunk: os._exit(0)\n"
        "        buf += chunk\n"
        "    line, _, buf = buf.partition(b'\\n')\n"
        "    r = json.loads(line)\n"
        "    if r['op'] == 'exit': os._exit(0)\n"
        "    os.write(3, (json.dumps({'id': r['id'], 'ok': True, 'value': ['i', '0']}) + '\\n')"
        ".encode())\n"),
}


@pytest.fixture(scope="module")
def reward():
    return make_code_exec(wall_s=3.0, cpu_s=1, memory_mb=256, allow_weak_sandbox=True)


def test_correct_code_passes_every_kind_of_test(reward):
    assert reward(["p"] * 2, [ADD, IO_PROGRAM], tests=[ASSERTS, IO]) == [1.0, 1.0]


@pytest.mark.parametrize("name", list(ATTACKS))
def test_adversarial_completion_scores_zero(reward, name):
    code = ATTACKS[name]
    assert reward(["p"] * 2, [code, code], tests=[ASSERTS, IO]) == [0.0, 0.0], name


def test_sys_exit_after_a_correct_answer_still_counts(reward):
    """Ending normally with exit code 0 is the end of a program: the tests decide."""
    code = ADD + "import sys\nif __name__ == '__main__':\n    sys.exit(0)\n"
    assert reward(["p"], [code], tests=[ASSERTS]) == [1.0]
    assert reward(["p"], [IO_PROGRAM + "raise SystemExit(0)\n"], tests=[IO]) == [1.0]
    assert reward(["p"], [IO_PROGRAM + "raise SystemExit(1)\n"], tests=[IO]) == [0.0]


def test_scores_are_the_fraction_passed(reward):
    half = "def add(a, b):\n    return a + b if isinstance(a, int) else None\n"
    assert reward(["p"], [half], tests=[ASSERTS]) == [pytest.approx(3 / 4)]
    adder = "```python\n" + ADD + "if __name__ == '__main__':\n" \
            "    print(sum(map(int, input().split())))\n```"
    io_tests = [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5", "output": "10"},
                {"input": "1 1", "output": "3"}]
    scores = reward(["p"] * 3, [adder, "while True: pass", adder],
                    tests=[io_tests, ["assert True"], None])
    assert scores == [pytest.approx(2 / 3), 0.0, None]
    assert reward(["p"], [adder]) == [None]
    assert reward(["p"], [ADD], tests=['["assert add(1, 2) == 3"]']) == [1.0]
    assert load_reward("code_exec(column='cases', cpu_s=1, allow_weak_sandbox=True)")(
        ["p"], [adder], cases=[[{"input": "2 2", "output": "4"}]]) == [1.0]


def test_a_test_that_is_not_python_is_an_error_not_a_zero(reward):
    with pytest.raises(ValueError, match="not valid Python"):
        reward(["p"], [ADD], tests=[["assert add(1, 2) =="]])


def test_extract_code_takes_the_last_fenced_block():
    text = "try\n```python\nprint(1)\n```\nbetter:\n```python\nprint(2)\n```\n"
    assert extract_code(text) == "print(2)\n"
    assert extract_code("print(3)") == "print(3)"


def test_plan_hides_the_expected_literal():
    steps = plan_assert_test("x = f(3)\nassert x == 9\nassert [1, 2] != g()\nassert h()\n"
                             "assert f(1) == f(2)\nassert r() is None\nassert r() is ()")
    kinds = [(s.kind, s.src) for s in steps]
    assert kinds == [("exec", "x = f(3)"), ("check", "x"), ("check", "g()"),
                     ("exec", "assert h()\nassert f(1) == f(2)"), ("check", "r()"),
                     ("exec", "assert r() is ()")]
    assert all("9" not in s.src and "[1, 2]" not in s.src for s in steps)
    assert steps[2].literal_left and steps[2].expected == [1, 2]


def test_decode_accepts_plain_data_only():
    tree = ["d", [[["s", "k"], ["t", [["i", "-2a"], ["f", "nan"], ["y", "AAE="]]]],
                  [["F", [["b", True]]], ["S", [["c", ["1.0", "-2.0"]], ["n", None]]]]]]
    value = decode(tree)
    assert value["k"][0] == -42 and value["k"][2] == b"\x00\x01"
    assert value[frozenset({True})] == {complex(1, -2), None}
    for bad in (["o", "x"], ["i", "zz"], ["l", "notalist"], ["d", [[["l", []], ["n", None]]]],
                [["s", "x"]], "s", ["y", "!!"], ["t", [["s", "x"]] * 2 + [1]]):
        with pytest.raises(ValueError):
            decode(bad)


def test_holds_compares_like_python():
    def check(op, expected, value, left=False):
        return holds(Step("check", "e", op, expected, left), value)
    assert check(ast.Eq, 5, 5.0) and not check(ast.Eq, (1, 2), [1, 2])
    assert check(ast.In, [1, 2], 2) and check(ast.In, 2, [1, 2], left=True)
    assert check(ast.Lt, 0.01, 0.001) and not check(ast.Lt, 0.01, "x")
    assert check(ast.Is, None, None) and not check(ast.IsNot, None, None)


def test_without_a_sandboxing_tool_code_exec_is_refused_unless_accepted(monkeypatch, capsys):
    weak = SandboxTool("weak", "bubblewrap is not installed")
    monkeypatch.setattr(sandbox_module, "_tool", weak)
    monkeypatch.setattr(sandbox_module, "_announced", False)
    with pytest.raises(SandboxError, match="refusing to run model-written code: bubblewrap is "
                                           "not installed.*--allow-weak-sandbox"):
        make_code_exec()
    reward = make_code_exec(wall_s=3.0, cpu_s=1, allow_weak_sandbox=True)
    assert "WARNING: weak sandbox" in capsys.readouterr().err
    assert reward(["p"] * 2, [ADD, ATTACKS["sys.exit(0) first"]], tests=[ASSERTS] * 2) == [1, 0]


@pytest.mark.skipif(not sandbox_tool().strong, reason="no sandboxing tool here")
def test_the_tool_in_use_is_announced(monkeypatch, capsys):
    monkeypatch.setattr(sandbox_module, "_announced", False)
    make_code_exec()
    assert f"code_exec: sandbox: {sandbox_tool().summary}" in capsys.readouterr().err


def test_the_expected_value_never_enters_the_sandbox(reward):
    """A program that searches its whole process and file system for the expected answer (the
    harness's memory, argv, environment, files, frames) finds nothing to return; the control
    shows the same search finds the value once a test puts it inside."""
    secret = "SECRET-7f3a9c1e"
    snoop = (
        "import gc, os, re, sys\n"
        "PATTERN = re.compile('SEC' + 'RET-[0-9a-f]{8}')\n"
        "def found():\n"
        "    seen = [repr(o) for o in gc.get_objects() if isinstance(o, (dict, list, tuple))]\n"
        "    seen += sys.argv + list(os.environ.values())\n"
        "    f = sys._getframe()\n"
        "    while f:\n"
        "        seen.append(repr(f.f_locals)); f = f.f_back\n"
        "    for root, _, files in os.walk('/sandbox'):\n"
        "        seen += [open(os.path.join(root, n), errors='ignore').read() for n in files]\n"
        "    for text in seen:\n"
        "        m = PATTERN.search(text)\n"
        "        if m:\n"
        "            return m.group(0)\n"
        "    return 'nothing'\n")
    hidden = [f"assert found() == {secret!r}", f"assert {secret!r} == found()",
              f"assert found() in [{secret!r}]"]
    assert reward(["p"] * 2, [snoop, f"def found():\n    return {secret!r}\n"],
                  tests=[hidden, hidden]) == [0.0, 1.0]
    visible = [f"x = {secret!r}\nassert found() == x"]  # the control: x is in its namespace
    assert reward(["p"], [snoop], tests=[visible]) == [1.0]
