"""Run one benchmark run in its own process and measure it from outside.

Each run gets a fresh interpreter, so one run's allocator caches, compiled kernels or leaked
memory cannot distort the next. Its stdout and stderr go to ``<run dir>/log.txt``; while it runs
the harness polls the run's metrics JSONL and prints one progress line per new step. The
process's peak resident set size and CPU time come from ``os.wait4`` (the kernel's accounting
of that child alone), the same way for every runner.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclasses.dataclass
class ProcResult:
    returncode: int
    wall_s: float
    peak_rss_bytes: int
    cpu_s: float
    log: Path
    timed_out: bool = False

    def tail(self, lines: int = 15) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def failure(self) -> str:
        """One line saying why (exit code and the log's last line), then the log's tail."""
        tail = self.tail()
        last = next((line for line in reversed(tail.splitlines()) if line.strip()), "no output")
        timed = " (timed out)" if self.timed_out else ""
        return f"exit code {self.returncode}{timed}: {last.strip()}\nlog {self.log}:\n{tail}"


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def count_steps(metrics: Path) -> tuple[int, float | None]:
    """(train records so far, last loss) in a metrics JSONL that may still be written."""
    if not metrics.exists():
        return 0, None
    n, loss = 0, None
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line being written
        if record.get("split", "train") == "train" and "loss" in record:
            n, loss = n + 1, record["loss"]
    return n, loss


def run(command: Sequence[str], run_dir: Path, label: str, metrics: Path, total_steps: int,
        env: dict[str, str] | None = None, timeout: float | None = None,
        poll: float = 2.0) -> ProcResult:
    """Run ``command`` to completion; print progress; return exit code, peak RSS, CPU time."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "log.txt"
    (run_dir / "command.txt").write_text(" ".join(command) + "\n")
    start = time.perf_counter()
    seen, timed_out = 0, False
    with log.open("w") as out:
        proc = subprocess.Popen(list(command), stdout=out, stderr=subprocess.STDOUT,
                                env=child_env(env), cwd=str(REPO))
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            steps, loss = count_steps(metrics)
            if steps > seen:
                seen = steps
                rate = (time.perf_counter() - start) / steps
                print(f"  {label}: step {steps}/{total_steps} loss {loss:.4f} "
                      f"({rate:.1f} s/step incl. start-up)", file=sys.stderr, flush=True)
            if timeout and time.perf_counter() - start > timeout:
                proc.kill()
                timed_out = True
            time.sleep(poll)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: tell Popen
    peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return ProcResult(proc.returncode, time.perf_counter() - start, int(peak),
                      usage.ru_utime + usage.ru_stime, log, timed_out)
