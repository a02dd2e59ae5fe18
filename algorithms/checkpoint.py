"""Checkpoints: ``<run_dir>/checkpoints/step_000010/``, written atomically, checked on resume.

A checkpoint holds what the backend saves (trainable weights, optimiser state, backend RNG),
``trainer_state.json`` (step, data cursor, resolved config), ``fingerprints.json`` (the data
files and model the run trains on, see :mod:`algorithms.rundir`) and ``manifest.json`` (every
file's size and content digest). It is written to a hidden temporary sibling, fsync'ed and
renamed into place, so a crash never leaves a half-written checkpoint behind.

Resuming (:func:`resume_from_checkpoint`) takes the newest checkpoint whose files match their
manifest and that the backend loads; a truncated or corrupt one is reported and the previous
complete one is used. The run's logs are then cut back to that step (:func:`trim_run_logs`),
so ``metrics.jsonl`` and ``completions.jsonl`` never repeat a step.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from converters.atomic import atomic_output_dir, write_text_atomically
from converters.fingerprint import file_digest

_STEP_DIR = re.compile(r"^step_(\d{6,})$")
STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
FINGERPRINTS = "fingerprints.json"

# Fields a resumed run may change; any other difference from the checkpoint is an error.
RESUMABLE_CHANGES = {"steps", "epochs", "resume", "progress", "log_every", "eval_every",
                     "eval_batches", "save_every", "sample_prompt", "sample_max_tokens", "run_dir",
                     "zero_grad_patience", "unscored_patience", "allow_weak_sandbox",
                     "reward_timeout", "log_completions_every", "report_to", "wandb_project",
                     "wandb_mode", "plots", "parallel", "dist_timeout"}


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def write_atomically(target: Path, fill: Callable[[Path], None]) -> Path:
    """Call ``fill(tmp_dir)`` on a fresh temporary sibling of ``target``, then rename it."""
    with atomic_output_dir(target, force=True) as tmp:
        fill(tmp)
    return Path(target)


def save_checkpoint(run_dir: Path, step: int, backend: Any, trainer_state: dict,
                    world: Any = None) -> Path:
    """Write the checkpoint of ``step``. In a distributed run every rank calls it (FSDP2
    gathers the shards, per-rank RNG states are collected) and rank 0 alone writes, between
    two barriers: no rank runs ahead of a checkpoint, and none is written by half the job."""
    from .distributed import current

    world = world or current()
    world.barrier()
    if not world.main:
        backend.save_state(None)
        world.barrier()
        return checkpoint_dir(run_dir, step)

    def fill(tmp: Path) -> None:
        backend.save_state(str(tmp))
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2, sort_keys=True))
        run_fingerprints = Path(run_dir) / FINGERPRINTS
        if run_fingerprints.is_file():
            (tmp / FINGERPRINTS).write_bytes(run_fingerprints.read_bytes())
        manifest = {p.name: {"size": p.stat().st_size, "digest": file_digest(p)}
                    for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))

    path = write_atomically(checkpoint_dir(run_dir, step), fill)
    world.barrier()
    return path


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Every ``step_NNNNNN`` dir, newest first (complete or not)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` cannot be resumed from (a missing, truncated or altered file), or None.
    Checkpoints written before manifests existed are checked for their state file only."""
    checkpoint = Path(checkpoint)
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text())
        if not isinstance(state, dict) or not {"step", "cursor", "config"} <= state.keys():
            return f"{STATE_FILE} lacks the step, cursor or config"
    except (OSError, ValueError) as e:
        return f"{STATE_FILE} is missing or unreadable ({e.__class__.__name__})"
    if not (checkpoint / MANIFEST).is_file():
        return None
    try:
        manifest = json.loads((checkpoint / MANIFEST).read_text())
        for name, entry in manifest.items():
            path = checkpoint / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != entry["size"]:
                return f"{name} is {path.stat().st_size} bytes, {entry['size']} were written"
            if file_digest(path) != entry["digest"]:
                return f"{name} was altered after it was written"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({e.__class__.__name__})"
    return None


def usable_checkpoints(run_dir: Path, say: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Checkpoints that pass :func:`checkpoint_problem`, newest first, checked lazily (older
    ones only when a newer one is unusable); each one skipped is said."""
    say = say or (lambda message: print(message, file=sys.stderr))
    for _, path in checkpoints(run_dir):
        problem = checkpoint_problem(path)
        if problem is None:
            yield path
        else:
            say(f"--resume: skipping {path}: incomplete or corrupt ({problem})")


def latest_checkpoint(run_dir: Path) -> Path | None:
    return next(usable_checkpoints(run_dir, say=lambda message: None), None)


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


def resume_from_checkpoint(cfg: Any, backend: Any, run_dir: Path) -> dict:
    """Load the newest usable checkpoint into ``backend`` (falling back past any that will not
    load, with a message), cut the run's logs back to its step, and return its trainer state.

    In a distributed run rank 0 chooses the checkpoint and every rank loads it from the run
    dir (which every rank must see at the same path; a rank that cannot is named)."""
    from .distributed import check_resume, current

    world = current()
    candidates = usable_checkpoints(run_dir) if world.main else iter(())

    def choose() -> Path | None:
        found = next(candidates, None)
        found = world.broadcast(None if found is None else str(found))
        return None if found is None else Path(found)

    path = choose()
    if path is None:
        raise FileNotFoundError(
            f"--resume: no complete checkpoint under {Path(run_dir) / 'checkpoints'}")
    while True:
        _check_every_rank_sees(path, world)
        state = read_trainer_state(path)
        if state.get("backend") != backend.name:
            raise ValueError(f"--resume: {path} was written by the {state.get('backend')} "
                             f"backend; this is the {backend.name} backend")
        saved = check_resume(state, state["config"], cfg, world, path)
        check_resume_config(saved, cfg.to_dict(), path)
        try:
            backend.load_state(str(path))
            problem = None
        except Exception as e:  # noqa: BLE001 - any failure to load is a corrupt checkpoint
            problem = f"{world.tag()}{e}"
        problems = [p for p in world.gather(problem) if p]
        if not problems:
            break
        earlier = choose()
        if earlier is None:
            raise ValueError(f"--resume: {path} does not load ({problems[0]}); no earlier "
                             "complete checkpoint is left") from None
        if world.main:
            print(f"--resume: {path} does not load ({problems[0]}); falling back to {earlier}",
                  file=sys.stderr)
        path = earlier
    if world.main:
        trim_run_logs(run_dir, int(state["step"]))
    return state


def _check_every_rank_sees(path: Path, world: Any) -> None:
    """Every rank must read the checkpoint rank 0 chose, byte for byte (its manifest)."""
    if world.size == 1:
        return
    try:
        seen = file_digest(path / MANIFEST) if (path / MANIFEST).is_file() else \
            file_digest(path / STATE_FILE)
    except OSError:
        seen = None
    views = world.gather(seen)
    for rank, view in enumerate(views):
        if view != views[0]:
            host = world.hosts[rank] if world.hosts else "?"
            what = "cannot read" if view is None else "sees another copy of"
            raise ValueError(f"--resume: rank {rank} (on {host}) {what} {path}: every rank "
                             "reads the checkpoint from --run-dir, which must be the same "
                             "directory on every host (a shared filesystem, or a copy at the "
                             "same path)")


def trim_run_logs(run_dir: Path, step: int, drop_valid_at_step: bool = False) -> None:
    """Drop what a run logged after checkpoint ``step`` (and any torn last line), so the resumed
    run does not log those steps twice: ``metrics.jsonl`` rows with a later step (and, with
    ``drop_valid_at_step``, the validation row at ``step`` itself: the final evaluation that is
    about to be redone), ``completions.jsonl`` rows generated at ``step`` or later."""
    rules = {"metrics.jsonl": lambda r: r["step"] < step or (
                 r["step"] == step and not (drop_valid_at_step and r.get("split") == "valid")),
             "completions.jsonl": lambda r: r["step"] < step}
    for name, keep in rules.items():
        path = Path(run_dir) / name
        if not path.is_file():
            continue
        kept, dropped = [], 0
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
                ok = isinstance(row, dict) and isinstance(row.get("step"), int) and keep(row)
            except ValueError:
                ok = False
            if ok:
                kept.append(line + "\n")
            else:
                dropped += 1
        if dropped:
            write_text_atomically(path, "".join(kept))
