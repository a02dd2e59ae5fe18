"""Several processes on the MLX backend: ``mx.distributed`` (ring over TCP, MPI, NCCL, JACCL).

:class:`MLXWorld` joins the group ``mlx.launch`` (or the ring backend's own ``MLX_RANK`` /
``MLX_HOSTFILE`` variables, or ``mpirun``) describes, through ``mx.distributed.init``. MLX has
no sharded training: every rank holds the model (data parallel), and
:func:`sum_gradients` adds the accumulated gradients of every rank with ``all_sum`` in
buckets before the optimiser step, so the step equals the one-process step (the losses are
already shares of the GLOBAL step, see :mod:`algorithms.distributed`).

Host-side sums run in float32 on the CPU stream (token counts stay exact below 2**24 per
sum); objects travel as pickled bytes through ``all_gather`` of uint8 arrays.

When a peer dies the ring backend does not always raise: a collective in flight can complete
with stale buffers, and one started afterwards can wait forever. So every collective here
carries a check value (the collective's sequence number, which every rank knows) that must come
back summed exactly, and a watchdog thread stops this rank with a message naming the peer when
a rank on the same host has exited, or when a collective has waited ``--dist-timeout`` seconds.
"""

from __future__ import annotations

import os
import pickle
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from algorithms.distributed import DistributedError, World, peer_failure_message

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
        self._sequence, self.busy = 0, None  # busy: (what, since) while in a collective
        me = (socket.gethostname(), os.getpid())
        table = self.gather(me)
        self.hosts = tuple(host for host, _ in table)
        peers = [(r, pid) for r, (host, pid) in enumerate(table) if host == me[0] and r != self.rank]
        Watchdog(self, peers, float(cfg.dist_timeout)).start()

    def check_value(self) -> float:
        """The next collective's check value, the same on every rank."""
        self._sequence = self._sequence % 65536 + 1
        return float(self._sequence)

    def summed(self, flat: mx.array, what: str) -> mx.array:
        """``all_sum`` of a flat float32 array, its check value verified."""
        check = self.check_value()
        self.busy = (what, time.monotonic())
        try:
            out = mx.distributed.all_sum(mx.concatenate([flat, mx.array([check])]),
                                         group=self.group, stream=mx.cpu)
            mx.eval(out)
        finally:
            self.busy = None
        if out[-1].item() != check * self.size:
            raise RuntimeError(f"[ring] connection to a peer was lost ({what} came back with "
                               "stale data)")
        return out[:-1]

    def all_sum(self, values: Any) -> np.ndarray:
        values = np.asarray(values, dtype=np.float32)
        out = self.summed(mx.array(values.reshape(-1)), "a sum")
        return np.array(out, dtype=np.float64).reshape(values.shape)

    def gather(self, obj: Any) -> list:
        data = np.frombuffer(pickle.dumps(obj), dtype=np.uint8)
        lengths = np.zeros(self.size)
        lengths[self.rank] = len(data)
        lengths = self.all_sum(lengths).astype(np.int64)
        check = int(self.check_value())
        padded = np.zeros((1, int(lengths.max()) + 2), np.uint8)
        padded[0, :len(data)] = data
        padded[0, -2:] = (check % 256, check // 256)
        self.busy = ("a gather", time.monotonic())
        try:
            rows = np.array(mx.distributed.all_gather(mx.array(padded), group=self.group,
                                                      stream=mx.cpu))
        finally:
            self.busy = None
        if any(tuple(row[-2:]) != (check % 256, check // 256) for row in rows):
            raise RuntimeError("[ring] connection to a peer was lost (a gather came back with "
                               "stale data)")
        return [pickle.loads(rows[r, :lengths[r]].tobytes()) for r in range(self.size)]

    def barrier(self) -> None:
        self.all_sum(np.zeros(1))

    def peer_failure(self, exc: BaseException) -> bool:
        text = str(exc)
        return isinstance(exc, RuntimeError) and ("[ring]" in text or "[mpi]" in text
                                                  or "peer" in text or "[jaccl]" in text)


def init_world(cfg: Any) -> World:
    """The job's group; one process when the launcher started just one (``mlx.launch -n 1``
    writes an empty host file)."""
    hostfile = os.environ.get("MLX_HOSTFILE")
    if hostfile and Path(hostfile).is_file() and not Path(hostfile).read_text().strip():
        return World()
    return MLXWorld(cfg)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")  # Linux: an exited child not yet reaped is a zombie
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class Watchdog(threading.Thread):
    """Stops this rank (exit 1, one line naming the peer) when a rank on this host has exited,
    or when a collective has waited longer than the timeout (a peer on another host is gone)."""

    def __init__(self, world: MLXWorld, peers: list[tuple[int, int]], timeout: float) -> None:
        super().__init__(name="posttrain-watchdog", daemon=True)
        self.world, self.peers, self.timeout = world, peers, timeout

    def run(self) -> None:
        while True:
            time.sleep(0.5)
            for rank, pid in self.peers:
                if not _alive(pid):
                    self.stop(rank, f"rank {rank} (pid {pid} on this host) exited")
            busy = self.world.busy
            if busy is not None and time.monotonic() - busy[1] > self.timeout:
                self.stop(None, f"no answer from the other ranks for {self.timeout:.0f}s "
                          f"(--dist-timeout) in {busy[0]}")

    def stop(self, rank: int | None, why: str) -> None:
        print(f"error: {self.world.tag()}{peer_failure_message(RuntimeError(why), self.world, rank)}",
              file=sys.stderr, flush=True)
        os._exit(1)


def sum_gradients(grads: Any, world: World) -> Any:
    """Every rank's accumulated gradients added up (``all_sum`` over flat float32 buckets)."""
    flat = tree_flatten(grads)
    out, bucket, size = [], [], 0

    def flush() -> None:
        nonlocal bucket, size
        if not bucket:
            return
        joined = mx.concatenate([g.astype(mx.float32).reshape(-1) for _, g in bucket])
        summed = world.summed(joined, "the gradient sum")
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
