"""Data parallelism at the boundary: who this process is, and the algorithm side of the math.

A run started by a launcher (``torchrun`` for ``cuda_ft``, ``mlx.launch`` or the ring
backend's ``MLX_RANK`` / ``MLX_HOSTFILE`` variables for ``mlx_ft``) has ``size`` ranks. Each
runs the same command; the backend's :class:`World` (``cuda_ft.distributed``,
``mlx_ft.distributed``) wraps the engine's own collectives (``torch.distributed`` with gloo or
NCCL, ``mx.distributed`` ring / MPI): this module never moves bytes itself.

What stays true whatever the world size (``N`` ranks of micro-batch ``b`` equal one process of
micro-batch ``N b``):

- offline, a step's micro-batches come from the one seeded plan built with the GLOBAL
  micro-batch ``N b`` (:func:`data_config`); each rank takes its contiguous share of every
  micro-batch's rows (:func:`shard_batch`); ``num_items``, the row / token shares
  (``micro_fraction``), the chosen-token count and KTO's KL estimate are sums over every rank
  (:meth:`World.all_sum`), so a micro-batch's loss is its share of the GLOBAL step loss;
- online, every rank draws the same prompts, samples and scores its whole groups, and the
  completions and rewards are gathered (:meth:`World.gather`): group statistics, estimators and
  DAPO's fill see the whole generation batch; each rank trains on its share of every mini-batch;
- backends sum gradients over ranks before clipping (DDP / FSDP2 on torch, ``all_sum`` on MLX),
  so the update equals the one-process update;
- a rank with no rows in a pass still takes part (:func:`lockstep`, an empty batch): FSDP2
  gathers parameters in every forward, so every rank must run as many passes as the others.

Rank 0 alone writes metrics, checkpoints and adapters; every rank reads checkpoints from the
run dir (one machine, or a filesystem every host mounts at the same path).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from collections.abc import Iterable
from typing import Any

import numpy as np

# Which launcher's environment a process was started in, and the backend package it serves.
LAUNCHERS = {"cuda_ft": "torchrun", "mlx_ft": "mlx.launch"}


class DistributedError(ValueError):
    """The process group cannot be set up as asked (wrong launcher, bad world); one line."""


class World:
    """One process: the default world (every collective is the identity)."""

    rank, size, local_rank = 0, 1, 0
    engine = "none"        # gloo, nccl, ring, mpi...
    parallel = "none"      # ddp / fsdp (torch), data (mlx)
    hosts: tuple[str, ...] = ()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: Any) -> np.ndarray:
        """Element-wise sum over ranks of a float array (float64 out)."""
        return np.asarray(values, dtype=np.float64)

    def gather(self, obj: Any) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        return [obj]

    def barrier(self) -> None:
        """Return once every rank has called it."""

    def peer_failure(self, exc: BaseException) -> bool:
        """Whether ``exc`` says another rank is gone (its connection closed, a timeout)."""
        return False

    def close(self) -> None: ...

    # --- derived collectives -------------------------------------------------------------
    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        return obj if self.size == 1 else self.gather(obj if self.main else None)[0]

    def all_max(self, value: int) -> int:
        """The largest ``value`` over ranks."""
        if self.size == 1:
            return int(value)
        one_hot = np.zeros(self.size)
        one_hot[self.rank] = value
        return int(self.all_sum(one_hot).max())

    def describe(self, prog: str) -> str:
        """The start-up line: world size, rank layout, engine and parallelism."""
        layout: dict[str, list[int]] = {}
        for rank, host in enumerate(self.hosts or ("localhost",) * self.size):
            layout.setdefault(host, []).append(rank)
        hosts = "; ".join(f"{host}: ranks {_ranges(ranks)}" for host, ranks in layout.items())
        how = {"ddp": "DDP (every rank holds the model)",
               "fsdp": "FSDP2 (parameters, gradients and optimiser state sharded)",
               "data": "every rank holds the model, gradients summed with all_sum"}
        return (f"{prog}: distributed: world size {self.size} ({len(layout)} host"
                f"{'s' if len(layout) > 1 else ''}: {hosts}), engine {self.engine}, data "
                f"parallel: {how.get(self.parallel, self.parallel)}; this is rank {self.rank}")

    def tag(self) -> str:
        """``[rank r/N host]`` for messages, or "" in a one-process run."""
        if self.size == 1:
            return ""
        host = self.hosts[self.rank] if self.hosts else "localhost"
        return f"[rank {self.rank}/{self.size} {host}] "


def _ranges(ranks: list[int]) -> str:
    return f"{ranks[0]}-{ranks[-1]}" if len(ranks) > 1 and ranks[-1] - ranks[0] == \
        len(ranks) - 1 else ",".join(map(str, ranks))


_current: World = World()


def current() -> World:
    """The world this process belongs to (the one-process world unless :func:`init` ran)."""
    return _current


def install(world: World) -> World:
    global _current
    _current = world
    return world


def launcher() -> str | None:
    """The launcher whose environment this process runs in, or None."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env or {"RANK", "WORLD_SIZE", "MASTER_ADDR"} <= env.keys():
        return "torchrun"
    if any(k in env for k in ("MLX_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")):
        return "mlx.launch"
    return None


def init(backend_spec: str, cfg: Any) -> World:
    """Join the launcher's process group through the backend's engine (``<package>.
    distributed.init_world(cfg)``), or stay one process when no launcher started us."""
    package = backend_spec.split(".")[0]
    found = launcher()
    if found is None:
        if getattr(cfg, "parallel", "ddp") == "fsdp" and package == "cuda_ft":
            print(f"{package}: --parallel fsdp: one process, nothing to shard (start with "
                  "torchrun to shard over several)", file=sys.stderr, flush=True)
        return install(World())
    wanted = LAUNCHERS.get(package)
    if found != wanted:
        raise DistributedError(
            f"started by {found}, but python -m {package} runs across processes under "
            f"{wanted} (torchrun for cuda_ft, mlx.launch for mlx_ft); see README 'Several "
            "processes and machines'")
    module = importlib.import_module(f"{package}.distributed")
    return install(module.init_world(cfg))


def peer_failure_message(exc: BaseException, world: World | None = None,
                         rank: int | None = None) -> str:
    """The one line a rank prints when a collective failed because another rank is gone
    (``rank`` when known; with two ranks it is the other one)."""
    world = world or current()
    others = [r for r in range(world.size) if r != world.rank]
    if rank is None and len(others) == 1:
        rank = others[0]
    who = "another rank" if rank is None else f"rank {rank}"
    where = f" on {world.hosts[rank]}" if rank is not None and world.hosts else ""
    return (f"lost {who}{where} of the {world.size}-process job (it died, was killed, or its "
            f"machine or network went away): {' '.join(str(exc).split())[:240]}; every rank "
            "stops; the last checkpoint resumes with --resume")


def data_config(cfg: Any, world: World | None = None) -> Any:
    """``cfg`` as the data plans see it: the GLOBAL micro-batch (``--batch-size`` x ranks), so
    every rank builds the one seeded plan of a one-process run with that micro-batch."""
    world = world or current()
    if world.size == 1 or not hasattr(cfg, "batch_size"):
        return cfg
    return dataclasses.replace(cfg, batch_size=cfg.batch_size * world.size)


# --- sharding ---------------------------------------------------------------------------------
def shard(n: int, world: World | None = None) -> range:
    """This rank's contiguous share of ``n`` items (the first ``n % size`` ranks get one more)."""
    world = world or current()
    base, extra = divmod(n, world.size)
    start = world.rank * base + min(world.rank, extra)
    return range(start, start + base + (world.rank < extra))


def shard_batch(batch: Any, world: World | None = None) -> Any:
    """This rank's rows of a global micro-batch (an ``algorithms.data.Batch``)."""
    world = world or current()
    if world.size == 1:
        return batch
    rows = shard(len(batch.rows), world)
    return type(batch)(tuple(batch.rows[rows.start:rows.stop]))


def lockstep(items: list, world: World | None = None) -> list:
    """``items`` padded with None to the largest count over ranks: every rank then makes the
    same number of backend calls (a None slot is an empty batch)."""
    world = world or current()
    if world.size == 1:
        return list(items)
    return list(items) + [None] * (world.all_max(len(items)) - len(items))


def empty_like(arrays: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """A batch with no rows (a rank's empty share): every array cut to 0 rows (a one-token
    layout when there is no template); scalars kept."""
    if arrays is None:
        return {"input_ids": np.zeros((0, 1), np.int32), "targets": np.zeros((0, 1), np.int32),
                "loss_mask": np.zeros((0, 1), np.float32),
                "segment_ids": np.zeros((0, 1), np.int32)}
    return {k: (v[:0] if np.ndim(v) else v) for k, v in arrays.items()}


def is_empty(batch: dict[str, np.ndarray]) -> bool:
    return len(batch["input_ids"]) == 0


def combine(metrics: list[dict[str, float]], fractions: list[float], tokens: int,
            world: World | None = None) -> tuple[dict[str, float], int]:
    """One step's metrics over every rank and micro-batch, and its real tokens: ``loss`` summed
    (micro losses are already their share of the step), every other metric weighted by its
    micro-batch's GLOBAL share; empty micro-batches (``{}``) count for nothing. The same
    numbers on every rank (the guards stop every rank together)."""
    world = world or current()
    local: dict[str, float] = {}
    for m, f in zip(metrics, fractions):
        for key, value in m.items():
            local[key] = local.get(key, 0.0) + (value if key == "loss" else f * value)
    if world.size == 1:
        return local, tokens
    parts = world.gather((local, tokens))
    merged: dict[str, float] = {}
    for part, _ in parts:
        for key, value in part.items():
            merged[key] = merged.get(key, 0.0) + value
    return merged, sum(t for _, t in parts)


def gather_concat(local: Iterable, world: World | None = None) -> list:
    """The lists every rank holds, concatenated in rank order (whole groups stay together)."""
    world = world or current()
    local = list(local)
    return local if world.size == 1 else [x for part in world.gather(local) for x in part]


def check_resume(saved_state: dict, saved_config: dict, cfg: Any, world: World | None = None,
                 checkpoint: Any = "") -> dict:
    """Resuming on another world size is allowed when the global micro-batch (``--batch-size``
    x ranks) is the checkpoint's: the data cursor counts global micro-batches. Returns the
    saved config with ``batch_size`` restated per rank of THIS world (so the usual
    setting-by-setting check passes); a ValueError saying what to pass otherwise."""
    world = world or current()
    saved_world = int(saved_state.get("world_size", 1))
    if "batch_size" not in saved_config or saved_world == world.size:
        return saved_config
    saved_global = saved_config["batch_size"] * saved_world
    if saved_global % world.size or cfg.batch_size * world.size != saved_global:
        fits = (f"--batch-size {saved_global // world.size}" if saved_global % world.size == 0
                else f"a world size dividing {saved_global}")
        raise ValueError(
            f"--resume: {checkpoint} was trained on {saved_world} rank(s) x --batch-size "
            f"{saved_config['batch_size']} = a global micro-batch of {saved_global}; this run "
            f"has {world.size} x {cfg.batch_size} = {world.size * cfg.batch_size}, and the data "
            f"cursor counts global micro-batches: resume with {fits}")
    return {**saved_config, "batch_size": cfg.batch_size}


__all__ = ["DistributedError", "World", "check_resume", "combine", "current", "data_config",
           "empty_like", "gather_concat", "init", "install", "is_empty", "launcher", "lockstep",
           "peer_failure_message", "shard", "shard_batch"]
