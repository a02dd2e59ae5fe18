"""Metrics: one JSON object per line in ``<run_dir>/metrics.jsonl``, and a progress bar.

Logging services are null objects: with ``progress=False`` (or no terminal) the bar is a no-op
and the JSONL file is still written.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, run_dir: Path, total_steps: int, initial_step: int, progress: bool):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = self.path.open("a")
        self._bar = _make_bar(total_steps, initial_step) if progress else None

    def write(self, record: dict[str, Any]) -> None:
        record = {"time": round(time.time(), 3), **record}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._bar is not None and record.get("split") == "train":
            self._bar.set_postfix_str(_short(record), refresh=False)
        elif record.get("split") == "valid":
            shown = "loss" if "loss" in record else "reward"
            self.echo(f"step {record['step']}: valid {shown} {record[shown]:.4f}")

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


def _make_bar(total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)


def _short(r: dict[str, Any]) -> str:
    reward = f"reward {r['reward']:.3f} " if "reward" in r else ""
    return (f"{reward}loss {r['loss']:.4f} lr {r['learning_rate']:.2e} "
            f"{r['tokens_per_second']:.0f} tok/s mem {r['peak_memory_gb']:.2f}GB")
