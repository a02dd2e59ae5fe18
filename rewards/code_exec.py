"""``code_exec``: run the completion's Python code against test cases, in ``rewards.sandbox``.

The code is the last ```python (or ```py, or plain ```) fenced block of the completion, else the
whole completion. The test cases come from a column (default ``tests``); per sample, a list (or
the JSON text of a list) whose items are either

- ``{"input": "<stdin>", "output": "<expected stdout>"}``: the program runs with that stdin and
  passes when it exits 0 and its stdout equals the expected output, compared line by line with
  trailing whitespace and trailing blank lines ignored; or
- a string of Python statements, e.g. ``"assert add(2, 3) == 5"``: appended after the program
  (one process per test), passes when the process exits 0.

Score = passed / number of tests. None where the sample has no tests (no column, None, or []).
Each test runs in its own sandboxed process (fresh temp dir, limits from ``SandboxLimits``);
samples run concurrently on ``workers`` threads, each waiting on its child process.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .contract import completion_text
from .sandbox import SandboxLimits, run_python

_FENCE = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(text: str) -> str:
    """The last fenced code block of ``text``, else ``text`` itself."""
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else text


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


def _same_output(actual: str, expected: str) -> bool:
    def lines(s: str) -> list[str]:
        return [line.rstrip() for line in s.rstrip().splitlines()]
    return lines(actual) == lines(expected)


def run_test(code: str, test: Any, limits: SandboxLimits) -> bool:
    """Whether ``code`` passes one test case in the sandbox."""
    if isinstance(test, str):
        return run_python(f"{code}\n\n{test}\n", limits=limits).ok
    result = run_python(code, stdin=str(test["input"]), limits=limits)
    return result.ok and _same_output(result.stdout, str(test["output"]))


def code_exec_score(text: str, tests: Any, limits: SandboxLimits) -> float | None:
    cases = parse_tests(tests)
    if not cases:
        return None
    code = extract_code(text)
    return sum(run_test(code, t, limits) for t in cases) / len(cases)


def make_code_exec(column: str = "tests", wall_s: float = 5.0, cpu_s: int = 2,
                   memory_mb: int = 512, max_procs: int = 16,
                   max_output_bytes: int = 64_000, workers: int | None = None) -> Any:
    """Factory: fraction of the ``tests`` column's cases the completion's code passes, sandboxed.

    ``column``, the limits (see ``SandboxLimits``) and the thread count are its arguments."""
    limits = SandboxLimits(wall_s=wall_s, cpu_s=cpu_s, memory_mb=memory_mb, max_procs=max_procs,
                           max_output_bytes=max_output_bytes)
    n_workers = workers or max(1, min(8, os.cpu_count() or 1))

    def code_exec(prompts: Sequence[Any], completions: Sequence[Any],
                  **kwargs: Any) -> list[float | None]:
        tests = kwargs.get(column)
        if tests is None:
            return [None] * len(completions)
        texts = [completion_text(c) for c in completions]
        with ThreadPoolExecutor(n_workers) as pool:
            return list(pool.map(lambda i: code_exec_score(texts[i], tests[i], limits),
                                 range(len(texts))))

    code_exec.__doc__ = ("Fraction of the `tests` column's test cases the completion's code "
                         "passes, run in a sandbox.")
    return code_exec


code_exec = make_code_exec()
