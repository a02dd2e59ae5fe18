"""``code_exec``: run the completion's Python code against test cases, in ``rewards.sandbox``.

The code is the last ```python (or ```py, or plain ```) fenced block of the completion, else the
whole completion. The test cases come from a column (default ``tests``); per sample, a list (or
the JSON text of a list) whose items are either

- ``{"input": "<stdin>", "output": "<expected stdout>"}``: the program runs with that stdin and
  passes when it ran to the end and its stdout equals the expected output, compared line by
  line with trailing whitespace and trailing blank lines ignored; or
- a string of Python statements, e.g. ``"assert add(2, 3) == 5"``, run after the program.

Score = passed / number of tests. None where the sample has no tests (no column, None, or []).
Every test runs in its own fresh sandbox; a test counts as passed only when this process saw
it pass (``rewards.code_tests`` says exactly how). Samples run concurrently on ``workers``
threads, each waiting on its sandbox. Building the reward checks that a sandboxing tool works
here (``rewards.sandbox.require_sandbox``) and says which one on stderr.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .code_tests import parse_tests, plan_assert_test, run_test
from .contract import completion_text
from .sandbox import SandboxLimits, require_sandbox

_FENCE = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL)
_weak_allowed = False


def allow_weak_sandbox(allowed: bool = True) -> None:
    """``--allow-weak-sandbox``: accept the weaker guard where no sandboxing tool works."""
    global _weak_allowed
    _weak_allowed = allowed


def extract_code(text: str) -> str:
    """The last fenced code block of ``text``, else ``text`` itself."""
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else text


def code_exec_score(text: str, tests: Any, limits: SandboxLimits) -> float | None:
    cases = parse_tests(tests)
    if not cases:
        return None
    for case in cases:  # a malformed test is the dataset's bug: report it, never score it 0
        if isinstance(case, str):
            plan_assert_test(case)
    code = extract_code(text)
    return sum(run_test(code, t, limits) for t in cases) / len(cases)


def make_code_exec(column: str = "tests", wall_s: float = 5.0, cpu_s: int = 2,
                   memory_mb: int = 512, max_procs: int = 16, max_output_bytes: int = 64_000,
                   disk_mb: int = 64, workers: int | None = None,
                   allow_weak_sandbox: bool = False) -> Any:
    """Factory: fraction of the ``tests`` column's cases the completion's code passes, sandboxed.

    ``column``, the limits (see ``SandboxLimits``), the thread count and
    ``allow_weak_sandbox`` (run even where no sandboxing tool works) are its arguments."""
    limits = SandboxLimits(wall_s=wall_s, cpu_s=cpu_s, memory_mb=memory_mb, max_procs=max_procs,
                           max_output_bytes=max_output_bytes, disk_mb=disk_mb)
    require_sandbox(allow_weak_sandbox or _weak_allowed)
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
                         "passes, each run in its own sandbox.")
    code_exec.required_columns = (column,)
    return code_exec
