"""How ``code_exec`` decides that a program passed a test: only from what this process saw.

Test cases (per sample, a list, or the JSON text of one), each in a fresh sandbox
(:class:`rewards.sandbox.Session`):

- ``{"input": stdin, "output": expected}``: the program runs with that stdin; it passes when the
  worker saw it run to the end (``SystemExit(0)`` included) within the limits and its stdout
  equals ``expected`` line by line (trailing whitespace and blank lines ignored). ``expected``
  never enters the sandbox.
- an assert string (``"assert add(2, 3) == 5"``): the program is loaded, then the test's
  top-level statements run one by one in the program's namespace. A top-level
  ``assert E <op> L`` (or ``L <op> E``) whose ``L`` is a literal (number, string, bytes, tuple,
  list, dict, set, ``True``/``False``/``None``) and ``op`` one of ``== != < <= > >= in
  not in`` (``is`` / ``is not`` with ``None``/``True``/``False``) is a *hidden check*: only
  ``E`` is sent into the sandbox; its value comes back as plain data (a tagged JSON tree, never
  an object, so no ``__eq__`` of the program's runs here) and this process compares it with
  ``L``, which the program never sees. Every other statement runs in the sandbox and counts when
  the worker reports that it returned.

A test passes only when every reply came back, in order, within the wall clock, and said so.
Ending the process early (``sys.exit``, ``os._exit``, ``atexit``, signals), printing markers or
replacing things in the interpreter cannot make a step pass the worker did not see pass, and a
hidden check cannot pass without the right value. What a program could still fake, by
rewriting the worker itself, is the report of a non-hidden statement: write tests as I/O pairs
or literal comparisons where it matters.
"""

from __future__ import annotations

import ast
import base64
import json
import operator
from dataclasses import dataclass
from typing import Any

from .sandbox import SandboxLimits, Session

_OPS = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
        ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: "in", ast.NotIn: "not in",
        ast.Is: operator.is_, ast.IsNot: operator.is_not}
_SINGLETONS = (None, True, False)
_NOT_LITERAL = object()
MAX_NODES = 1_000_000
_SCALARS = {"i": lambda p: int(p, 16), "f": float, "s": str,
            "y": lambda p: base64.b64decode(p, validate=True)}


@dataclass(frozen=True)
class Step:
    """``exec`` (statements run in the sandbox) or ``check`` (``src`` is the expression E
    evaluated there; ``expected`` the literal L compared here, on the ``literal_left`` side)."""

    kind: str
    src: str
    op: type | None = None
    expected: Any = None
    literal_left: bool = False


def parse_tests(tests: Any) -> list[Any]:
    """One sample's test cases as a list (accepts the list or its JSON text)."""
    if tests is None:
        return []
    if isinstance(tests, str):
        tests = json.loads(tests)
    if not isinstance(tests, (list, tuple)):
        raise TypeError(f"code_exec: tests must be a list, got {type(tests).__name__}")
    for t in tests:
        ok = isinstance(t, str) or (isinstance(t, dict) and {"input", "output"} <= t.keys())
        if not ok:
            raise ValueError(f"code_exec: a test must be an assert string or "
                             f"{{'input', 'output'}}, got {t!r}")
    return list(tests)


def _literal(node: ast.expr) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _NOT_LITERAL


def _hidden_check(stmt: ast.stmt) -> Step | None:
    if not (isinstance(stmt, ast.Assert) and isinstance(stmt.test, ast.Compare)
            and len(stmt.test.ops) == 1):
        return None
    left, op, right = stmt.test.left, type(stmt.test.ops[0]), stmt.test.comparators[0]
    lit_left, lit_right = _literal(left), _literal(right)
    if (lit_left is _NOT_LITERAL) == (lit_right is _NOT_LITERAL):
        return None  # two expressions, or two literals: nothing to hide
    literal_left = lit_left is not _NOT_LITERAL
    expected, expr = (lit_left, right) if literal_left else (lit_right, left)
    if op in (ast.Is, ast.IsNot) and not any(expected is s for s in _SINGLETONS):
        return None
    return Step("check", ast.unparse(expr), op, expected, literal_left)


def plan_assert_test(test: str) -> list[Step]:
    """The steps of one assert-string test (module docstring); a ValueError if it is not Python."""
    try:
        tree = ast.parse(test)
    except SyntaxError as e:
        raise ValueError(f"code_exec: test {test[:80]!r} is not valid Python: {e.msg} "
                         f"(line {e.lineno})") from None
    steps: list[Step] = []
    pending: list[ast.stmt] = []
    for stmt in tree.body:
        check = _hidden_check(stmt)
        if check is None:
            pending.append(stmt)
            continue
        if pending:
            steps.append(Step("exec", ast.unparse(ast.Module(pending, []))))
            pending = []
        steps.append(check)
    if pending:
        steps.append(Step("exec", ast.unparse(ast.Module(pending, []))))
    return steps


def decode(node: Any) -> Any:
    """A value sent by the worker (``[tag, payload]`` trees) as plain Python data; ValueError
    for anything malformed."""
    budget = [MAX_NODES]

    def walk(n: Any, depth: int) -> Any:
        budget[0] -= 1
        if budget[0] < 0 or depth > 80 or not (isinstance(n, list) and len(n) == 2):
            raise ValueError("malformed value")
        tag, p = n
        if not isinstance(tag, str):
            raise ValueError("malformed value")  # noqa: TRY004 - one error type for bad data
        if tag in ("n", "e"):
            return None if tag == "n" else Ellipsis
        if tag == "b" and isinstance(p, bool):
            return p
        if tag in _SCALARS and isinstance(p, str):
            return _SCALARS[tag](p)
        if tag == "c" and isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p):
            return complex(float(p[0]), float(p[1]))
        if tag in ("l", "t", "S", "F") and isinstance(p, list):
            items = [walk(x, depth + 1) for x in p]
            return {"l": list, "t": tuple, "S": set, "F": frozenset}[tag](items)
        if tag == "d" and isinstance(p, list):
            pairs = []
            for pair in p:
                if not (isinstance(pair, list) and len(pair) == 2):
                    raise ValueError("malformed dict")
                pairs.append((walk(pair[0], depth + 1), walk(pair[1], depth + 1)))
            return dict(pairs)
        raise ValueError(f"unknown value tag {tag!r}")

    try:
        return walk(node, 0)
    except (TypeError, OverflowError, RecursionError) as e:
        raise ValueError(f"malformed value ({e})") from None


def holds(step: Step, value: Any) -> bool:
    """Whether ``E <op> L`` holds for the decoded value E (plain data on both sides)."""
    left, right = (step.expected, value) if step.literal_left else (value, step.expected)
    compare = _OPS[step.op]
    try:
        if compare == "in":
            return bool(left in right)
        if compare == "not in":
            return bool(left not in right)
        return bool(compare(left, right))
    except (TypeError, ValueError, OverflowError, RecursionError):
        return False  # Python would raise too: the assert fails


def same_output(actual: str, expected: str) -> bool:
    def lines(s: str) -> list[str]:
        return [line.rstrip() for line in s.rstrip().splitlines()]
    return lines(actual) == lines(expected)


def run_io_test(code: str, stdin: str, expected: str, limits: SandboxLimits) -> bool:
    session = Session(limits, stdin)
    try:
        reply = session.request("load", code=code)
    finally:
        result = session.close()
    return bool(reply and reply["ok"]) and not result.timed_out \
        and same_output(result.stdout, expected)


def run_assert_test(code: str, steps: list[Step], limits: SandboxLimits) -> bool:
    session = Session(limits)
    try:
        reply = session.request("load", code=code)
        if not (reply and reply["ok"]):
            return False
        for step in steps:
            reply = session.request("eval" if step.kind == "check" else "exec", src=step.src)
            if not (reply and reply["ok"]):
                return False
            if step.kind == "check":
                try:
                    value = decode(reply.get("value"))
                except ValueError:
                    return False
                if not holds(step, value):
                    return False
        return not session.timed_out
    finally:
        session.close()


def run_test(code: str, test: Any, limits: SandboxLimits) -> bool:
    """Whether ``code`` passes one test case (module docstring)."""
    if isinstance(test, str):
        return run_assert_test(code, plan_assert_test(test), limits)
    return run_io_test(code, str(test["input"]), str(test["output"]), limits)
