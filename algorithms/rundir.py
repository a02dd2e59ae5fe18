"""The run directory: one run at a time, a resume that cannot be fooled, files written whole.

:func:`open_run` is called once the flags, model and data have been checked, before the model
is loaded:

- it locks ``--run-dir`` (``flock`` on the directory itself, so no lock file is left behind):
  a second run in the same dir stops at once instead of interleaving its rows;
- without ``--resume`` it refuses a dir that holds checkpoints; logs left by a run that never
  checkpointed are discarded (they belong to no resumable run);
- with ``--resume`` it checks the newest complete checkpoint *before* anything is written: the
  backend, every run-shaping setting, ``--steps`` (not below the checkpoint's step), and the
  fingerprints of the data files and the model (content digests, see
  :mod:`converters.fingerprint`): changed files at the same paths are refused, naming what
  changed. A refused resume leaves ``config.json`` and everything else untouched.

:meth:`Run.commit` writes ``config.json`` and ``fingerprints.json`` (temporary sibling, fsync,
rename) once the backend has loaded; :meth:`Run.close` releases the lock and, when the run
failed before that and created the dir, removes it (nothing half-made is left behind).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from converters.atomic import write_text_atomically
from converters.fingerprint import differences, model_fingerprint

from . import checkpoint as ckpt

LOGS = ("metrics.jsonl", "completions.jsonl")


class RunDirError(ValueError):
    """The run dir cannot be used as asked (locked, refused resume...); the message says why."""


def data_fingerprint(data: Any) -> dict[str, dict]:
    """``{split: {"sha256", "examples"}}`` over every prepared example of the train / valid
    splits (tokens, loss masks, labels, reward columns): what the run's data cursor indexes
    into, after sources were read, mixed, held out and tokenised, whatever they are (files,
    dirs, Hub datasets)."""
    out = {}
    for split, plan in (("train", data.train), ("valid", data.valid)):
        dataset = getattr(plan, "dataset", plan)  # batch plans, or RL prompt sets
        if dataset is None:
            continue
        h = hashlib.sha256()
        for example in dataset.examples:
            _hash_example(h, example)
        out[split] = {"sha256": h.hexdigest(), "examples": len(dataset.examples)}
    return out


def _hash_example(h: Any, example: Any) -> None:
    import numpy as np

    if hasattr(example, "input_ids"):  # SFT examples and preference sides
        h.update(np.asarray(example.input_ids, dtype="<i8").tobytes() + b"m")
        h.update(np.asarray(example.loss_mask, dtype="<u1").tobytes() + b";")
    elif hasattr(example, "chosen"):
        _hash_example(h, example.chosen)
        _hash_example(h, example.rejected)
    elif hasattr(example, "sequence"):
        _hash_example(h, example.sequence)
        h.update(b"L1" if example.label else b"L0")
    else:  # an RL prompt: its tokens and the columns the rewards read
        h.update(np.asarray(example.prompt_ids, dtype="<i8").tobytes())
        h.update(json.dumps(example.columns, sort_keys=True, default=str).encode())


def run_fingerprints(cfg: Any, model_path: Path, data: Any) -> dict[str, Any]:
    """What a checkpoint must have been trained on to be resumed: data and model(s)."""
    from converters.models import resolve_model

    out: dict[str, Any] = {"data": data_fingerprint(data),
                           "model": model_fingerprint(model_path)}
    ref = cfg.reference_model
    if ref:
        out["ref_model"] = model_fingerprint(resolve_model(ref))
    if getattr(cfg, "init_adapter", ""):
        out["init_adapter"] = model_fingerprint(cfg.init_adapter)
    return out


class Run:
    """A locked run dir (see the module docstring)."""

    def __init__(self, path: Path, created: bool, fd: int | None) -> None:
        self.path, self.created, self._fd = path, created, fd
        self.committed = False
        self.writes = True

    @classmethod
    def elsewhere(cls, path: str | Path) -> Run:
        """The run dir as a rank other than 0 of a distributed run sees it: rank 0 holds the
        lock and writes everything; this rank only reads checkpoints from it."""
        run = cls(Path(path), created=False, fd=None)
        run.writes = False
        return run

    def commit(self, config_json: str, fingerprints: dict[str, Any]) -> None:
        if not self.writes:
            return
        write_text_atomically(self.path / ckpt.FINGERPRINTS,
                              json.dumps(fingerprints, indent=2, sort_keys=True) + "\n")
        write_text_atomically(self.path / "config.json", config_json)
        self.committed = True

    def close(self, failed: bool = False) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None
        if failed and self.created and not self.committed:
            shutil.rmtree(self.path, ignore_errors=True)


def _lock(path: Path) -> int | None:
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise RunDirError(f"--run-dir {path}: another run is using it right now (it holds the "
                          "lock); wait for it to finish or choose another --run-dir") from None
    return fd


def open_run(cfg: Any, backend_name: str, planned_steps: int,
             fingerprints: dict[str, Any]) -> Run:
    """Lock ``cfg.run_dir`` and check it for this run (module docstring); raises
    :class:`RunDirError` with nothing written."""
    path = Path(cfg.run_dir)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"--run-dir {path}: is a file, not a directory")
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    run = Run(path, created, None)
    try:
        run._fd = _lock(path)
        if cfg.resume:
            _check_resume(cfg, path, backend_name, planned_steps, fingerprints)
        else:
            _check_fresh(path)
    except BaseException:
        run.close(failed=True)
        raise
    return run


def _check_fresh(path: Path) -> None:
    if ckpt.checkpoints(path):
        raise RunDirError(f"--run-dir {path} already holds checkpoints; pass --resume to continue "
                          "that run or choose another --run-dir")
    stale = [name for name in LOGS if (path / name).exists()]
    if stale:
        print(f"--run-dir {path}: discarding {', '.join(stale)} of a run that never saved a "
              "checkpoint", file=sys.stderr)
        for name in stale:
            (path / name).unlink()


def _check_resume(cfg: Any, path: Path, backend_name: str, planned_steps: int,
                  fingerprints: dict[str, Any]) -> None:
    problems: list[str] = []
    latest = next(ckpt.usable_checkpoints(path, say=problems.append), None)
    if latest is None:
        why = f" ({len(problems)} incomplete or corrupt, the newest: " \
              f"{problems[0].split(': ', 1)[1]})" if problems else ""
        raise RunDirError(f"--resume: no complete checkpoint under {path / 'checkpoints'}{why}")
    state = ckpt.read_trainer_state(latest)
    if state.get("backend") != backend_name:
        raise RunDirError(f"--resume: {latest} was written by the {state.get('backend')} "
                          f"backend; this is the {backend_name} backend")
    try:
        from .distributed import check_resume

        saved = check_resume(state, state["config"], cfg, checkpoint=latest)
        ckpt.check_resume_config(saved, cfg.to_dict(), latest)
    except ValueError as e:
        raise RunDirError(str(e)) from None
    step = int(state["step"])
    if planned_steps < step:
        what = f"--steps {cfg.steps}" if cfg.steps else f"--epochs {cfg.epochs} ({planned_steps} steps)"
        raise RunDirError(f"--resume: {what} is below the checkpoint's step {step} ({latest}); "
                          f"ask for more than {step} steps, or start a new --run-dir")
    if planned_steps == step and (path / "adapters").is_dir():
        raise RunDirError(f"--resume: the run already finished at step {step} (adapters in "
                          f"{path / 'adapters'}); raise --steps to train further")
    _check_fingerprints(latest, step, fingerprints)
    if planned_steps == step:  # finishing a run killed while writing its final artefacts
        ckpt.trim_run_logs(path, step, drop_valid_at_step=True)


def _check_fingerprints(latest: Path, step: int, now: dict[str, Any]) -> None:
    file = latest / ckpt.FINGERPRINTS
    if not file.is_file():
        print(f"--resume: {latest} records no data or model fingerprints (an older checkpoint); "
              "not checked", file=sys.stderr)
        return
    before = json.loads(file.read_text())
    since = f"since the checkpoint at step {step} ({latest})"
    advice = "resume with the files the run started with, or start a new --run-dir"
    for split in sorted(set(before.get("data", {})) | set(now["data"])):
        old, new = before.get("data", {}).get(split), now["data"].get(split)
        if old is None or new is None:
            state = "appeared" if old is None else "disappeared"
            raise RunDirError(f"--resume: the {split} split {state} {since}; {advice}")
        if old.get("sha256") != new["sha256"]:
            was = (f"{old['examples']} examples" if "examples" in old
                   else f"{old.get('lines', '?')} lines")
            raise RunDirError(
                f"--resume: the {split} data changed {since} (a source, its content, the mix, "
                f"the hold-out or the tokenisation): {was} then (sha256 "
                f"{str(old.get('sha256'))[:12]}), {new['examples']} examples now (sha256 "
                f"{new['sha256'][:12]}); {advice}")
    for key, what in (("model", "model"), ("ref_model", "reference model"),
                      ("init_adapter", "initial adapter (--init-adapter)")):
        changed = differences(before.get(key, {}), now.get(key, {}))
        if changed:
            raise RunDirError(f"--resume: the {what} changed {since}: {'; '.join(changed[:4])}; "
                              f"{advice}")
