"""Several processes on the MLX backend: ``mx.distributed`` (ring over TCP, MPI, NCCL, JACCL).

:class:`MLXWorld` joins the group ``mlx.launch`` (or the ring backend's own ``MLX_RANK`` /
``MLX_HOSTFILE`` variables, or ``mpirun``) describes, through ``mx.distributed.init``. MLX has
no sharded training: every rank holds the model (data parallel), and
:func:`sum_gradients` adds the accumulated gradients of every rank with ``all_sum`` in
buckets before the optimiser step, so the step equals the one-process step (the losses are
already shares of the GLOBAL step, see :mod:`algorithms.distributed`).

Host-side sums run in float32 on the CPU stream (token counts stay exact below 2**24 per
sum); objects travel as pickled bytes through ``all_gather`` of uint8 arrays.
"""

from __future__ import annotations

import os
import pickle
import socket
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from algorithms.distributed import DistributedError, World

BUCKET = 1 << 25  # floats per all_sum of gradients (128 MiB of float32)


def _engine() -> str:
    env = os.environ
    if "MLX_HOSTFILE" in env or "MLX_RANK" in env:
        return "ring" if "MLX_JACCL_COORDINATOR" not in env else "jaccl"
    if "OMPI_COMM_WORLD_SIZE" in env or "PMI_SIZE" in env:
        return "mpi"
    return "any"


class MLXWorld(World):
    """The ``mx.distributed`` group of an ``mlx.launch`` job."""

    parallel = "data"

    def __init__(self, cfg: Any) -> None:
        if getattr(cfg, "parallel", "ddp") == "fsdp":
            raise DistributedError("--parallel fsdp: FSDP2 is the torch backend's (torchrun -m "
                                   "cuda_ft); mlx_ft trains data parallel (--parallel ddp)")
        self.engine = _engine()
        try:
            backend = "ring" if self.engine == "ring" else "any"
            self.group = mx.distributed.init(strict=True, backend=backend)
        except (RuntimeError, ValueError) as e:
            raise DistributedError(f"mx.distributed could not join the job ({e}); start with "
                                   "mlx.launch -n N -- python -m mlx_ft ... or set MLX_RANK "
                                   "and MLX_HOSTFILE for the ring backend") from None
        self.rank, self.size = self.group.rank(), self.group.size()
        self.local_rank = self.rank
        self.hosts = tuple(self.gather(socket.gethostname()))

    def all_sum(self, values: Any) -> np.ndarray:
        array = mx.array(np.asarray(values, dtype=np.float32))
        out = mx.distributed.all_sum(array, group=self.group, stream=mx.cpu)
        return np.array(out, dtype=np.float64)

    def gather(self, obj: Any) -> list:
        data = np.frombuffer(pickle.dumps(obj), dtype=np.uint8)
        lengths = np.zeros(self.size)
        lengths[self.rank] = len(data)
        lengths = self.all_sum(lengths).astype(np.int64)
        padded = np.zeros((1, int(lengths.max())), np.uint8)
        padded[0, :len(data)] = data
        rows = np.array(mx.distributed.all_gather(mx.array(padded), group=self.group,
                                                  stream=mx.cpu))
        return [pickle.loads(rows[r, :lengths[r]].tobytes()) for r in range(self.size)]

    def barrier(self) -> None:
        self.all_sum(np.zeros(1))

    def peer_failure(self, exc: BaseException) -> bool:
        text = str(exc)
        return isinstance(exc, RuntimeError) and ("[ring]" in text or "[mpi]" in text
                                                  or "peer" in text or "[jaccl]" in text)


def init_world(cfg: Any) -> MLXWorld:
    return MLXWorld(cfg)


def sum_gradients(grads: Any, world: World) -> Any:
    """Every rank's accumulated gradients added up (``all_sum`` over flat float32 buckets)."""
    flat = tree_flatten(grads)
    out, bucket, size = [], [], 0

    def flush() -> None:
        nonlocal bucket, size
        if not bucket:
            return
        joined = mx.concatenate([g.astype(mx.float32).reshape(-1) for _, g in bucket])
        summed = mx.distributed.all_sum(joined, group=world.group, stream=mx.cpu)
        offset = 0
        for name, g in bucket:
            out.append((name, summed[offset:offset + g.size].reshape(g.shape).astype(g.dtype)))
            offset += g.size
        bucket, size = [], 0

    for name, g in flat:
        if size + g.size > BUCKET:
            flush()
        bucket.append((name, g))
        size += g.size
    flush()
    return tree_unflatten(out)
