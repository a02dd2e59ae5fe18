"""Checkpoints: ``<run_dir>/checkpoints/step_000010/``, written atomically.

A checkpoint holds what the backend saves (trainable weights, optimiser state, backend RNG) plus
``trainer_state.json`` (step, data cursor, resolved config). It is written to a hidden temporary
sibling and renamed into place, so a crash never leaves a half-written checkpoint behind, and
``latest_checkpoint`` only ever sees complete ones.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from converters.atomic import atomic_output_dir

_STEP_DIR = re.compile(r"^step_(\d{6,})$")
STATE_FILE = "trainer_state.json"

# Fields a resumed run may change; any other difference from the checkpoint is an error.
RESUMABLE_CHANGES = {"steps", "epochs", "resume", "progress", "log_every", "eval_every",
                     "eval_batches", "save_every", "sample_prompt", "sample_max_tokens", "run_dir"}


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def write_atomically(target: Path, fill: Callable[[Path], None]) -> Path:
    """Call ``fill(tmp_dir)`` on a fresh temporary sibling of ``target``, then rename it."""
    with atomic_output_dir(target, force=True) as tmp:
        fill(tmp)
    return Path(target)


def save_checkpoint(run_dir: Path, step: int, backend: Any, trainer_state: dict) -> Path:
    def fill(tmp: Path) -> None:
        backend.save_state(str(tmp))
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2, sort_keys=True))

    return write_atomically(checkpoint_dir(run_dir, step), fill)


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return max(found)[1] if found else None


def read_trainer_state(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


def check_resume_config(saved: dict, current: dict, checkpoint: Path) -> None:
    """Refuse to resume when a setting that shapes the run differs from the checkpoint's."""
    for key, value in current.items():
        if key in RESUMABLE_CHANGES or key not in saved:
            continue
        if saved[key] != value:
            raise ValueError(
                f"--resume: {checkpoint} was trained with {key}={saved[key]!r} but this run asks "
                f"for {key}={value!r}; use the same value or a new --run-dir"
            )
