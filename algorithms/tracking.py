"""Experiment trackers (``--report-to tensorboard wandb``): every metrics record, also sent there.

A tracker is a null object when not asked for: :func:`make_trackers` returns only the ones the
run names, and :class:`algorithms.metrics.MetricsLog` hands each record (``{"split", "step",
...}``) to every tracker it holds. Numbers are logged as ``<split>/<name>`` scalars at the
record's optimiser step (``train/loss``, ``valid/rewards/accuracy``...); the resolved config goes
to W&B's run config and to TensorBoard as a text summary.

- TensorBoard: event files in ``<run-dir>/tensorboard`` (``tensorboard --logdir runs``), written
  with the ``tensorboard`` package's own event writer (no TensorFlow, no torch).
- W&B: ``wandb.init`` with ``dir=<run-dir>``, project ``--wandb-project``, the run named after
  the run dir; its id is kept in ``<run-dir>/wandb/run_id`` so ``--resume`` continues the same
  W&B run (a fresh run gets a new id). ``--wandb-mode offline`` writes ``<run-dir>/wandb/offline-run-*`` (``wandb sync`` uploads
  it later); ``auto`` is online when W&B credentials are configured (``WANDB_API_KEY`` or
  ``WANDB_MODE``), offline otherwise, so a run never stops at a login prompt.

Whether each package is installed is checked before the model loads (:func:`check_available`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

REPORT_TO = ("tensorboard", "wandb")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_available(report_to: list[str]) -> None:
    """A ValueError naming the missing package of a ``--report-to`` entry."""
    import importlib.util

    for name in report_to:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise ValueError(f"--report-to {name}: the {PACKAGES[name]} package is not "
                             f"installed (pip install {PACKAGES[name]})")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics record as ``<split>/<name>`` tags."""
    split = record.get("split", "train")
    skip = {"split", "step", "time"}
    return {f"{split}/{k}": float(v) for k, v in record.items()
            if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


class TensorBoardTracker:
    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event, self._summary = Event, Summary
        self.writer = EventFileWriter(str(Path(run_dir) / "tensorboard"))
        text = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="text"))
        from tensorboard.compat.proto.tensor_pb2 import TensorProto
        from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto

        tensor = TensorProto(dtype=7, string_val=[json.dumps(config, indent=2).encode()],
                             tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=1)]))
        self.writer.add_event(Event(wall_time=time.time(), step=0, summary=Summary(
            value=[Summary.Value(tag="config", metadata=text, tensor=tensor)])))

    def log(self, record: dict[str, Any]) -> None:
        values = [self._summary.Value(tag=tag, simple_value=value)
                  for tag, value in scalars(record).items()]
        if values:
            self.writer.add_event(self._event(wall_time=record.get("time", time.time()),
                                              step=int(record.get("step", 0)),
                                              summary=self._summary(value=values)))

    def close(self) -> None:
        self.writer.close()


def wandb_mode(mode: str) -> str:
    """``online`` / ``offline`` for ``--wandb-mode`` (``auto``: see the module docstring)."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class WandbTracker:
    def __init__(self, run_dir: Path, config: dict[str, Any], project: str, mode: str,
                 resume: bool) -> None:
        import sys

        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        run_dir = Path(run_dir)
        id_file = run_dir / "wandb" / "run_id"
        if resume and id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            seed = f"{run_dir.resolve()}:{time.time_ns()}:{os.getpid()}"
            run_id = hashlib.sha256(seed.encode()).hexdigest()[:16]
            id_file.parent.mkdir(parents=True, exist_ok=True)
            id_file.write_text(run_id + "\n")
        mode = wandb_mode(mode)
        self.run = wandb.init(project=project, name=run_dir.name, id=run_id, resume="allow",
                              dir=str(run_dir), config=config, mode=mode)
        if mode == "offline":
            print(f"W&B offline: {self.run.dir.rsplit('/files', 1)[0]} "
                  "(upload later with: wandb sync <that dir>)", file=sys.stderr)

    def log(self, record: dict[str, Any]) -> None:
        values = scalars(record)
        if values:
            self.run.log(values, step=int(record.get("step", 0)))

    def close(self) -> None:
        self.run.finish()


def make_trackers(cfg: Any, run_dir: Path) -> list[Any]:
    """The trackers ``cfg.report_to`` names (none: an empty list)."""
    names = list(getattr(cfg, "report_to", []) or [])
    config = cfg.to_dict()
    out: list[Any] = []
    if "tensorboard" in names:
        out.append(TensorBoardTracker(run_dir, config))
    if "wandb" in names:
        out.append(WandbTracker(run_dir, config, cfg.wandb_project, cfg.wandb_mode, cfg.resume))
    return out
