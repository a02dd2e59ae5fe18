"""Metrics: one JSON object per line in ``<run_dir>/metrics.jsonl``, a progress bar, trackers.

Logging services are null objects: the bar exists only with ``progress`` on a terminal;
otherwise (a pipe, a log file, ``--no-progress``) every train record, written every
``--log-every`` steps, is echoed as one line instead. The JSONL file is always written, and
each record also goes to the experiment trackers given (:mod:`algorithms.tracking`).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, run_dir: Path, total_steps: int, initial_step: int, progress: bool,
                 trackers: list | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.total = total_steps
        self.trackers = list(trackers or [])
        self._file = self.path.open("a")
        bar = progress and sys.stderr.isatty()
        self._bar = _make_bar(total_steps, initial_step) if bar else None

    def write(self, record: dict[str, Any]) -> None:
        record = {"time": round(time.time(), 3), **record}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for tracker in self.trackers:
            tracker.log(record)
        if record.get("split") == "train":
            if self._bar is not None:
                self._bar.set_postfix_str(_short(record), refresh=False)
            else:
                self.echo(f"step {record['step']}/{self.total}: {_short(record)}")
        else:
            shown = "loss" if "loss" in record else "reward"
            if shown in record:
                self.echo(f"step {record['step']}: {record.get('split')} {shown} "
                          f"{record[shown]:.4f}")

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def echo(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._file.close()
        for tracker in self.trackers:
            tracker.close()


def _make_bar(total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)


def _short(r: dict[str, Any]) -> str:
    reward = f"reward {r['reward']:.3f} " if "reward" in r else ""
    grad = f"grad {r['grad_norm']:.3g} " if "grad_norm" in r else ""
    return (f"{reward}loss {r['loss']:.4f} lr {r['learning_rate']:.2e} {grad}"
            f"{r['tokens_per_second']:.0f} tok/s mem {r['peak_memory_gb']:.2f}GB")


class NullLog:
    """The metrics log of a rank other than 0 in a distributed run: rank 0 writes."""

    def write(self, record: dict[str, Any]) -> None: ...

    def advance(self, n: int = 1) -> None: ...

    def echo(self, message: str) -> None: ...

    def close(self) -> None: ...
