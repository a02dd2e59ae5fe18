"""Several processes on the torch backend: the group ``torchrun`` describes, DDP or FSDP2.

:class:`TorchWorld` joins the process group from ``torchrun``'s environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...): NCCL on GPUs (one per local rank) and a
gloo group beside it for the host-side sums and objects of :mod:`algorithms.distributed`; gloo
alone on CPUs. Collectives time out after ``--dist-timeout`` seconds.

:class:`Parallel` puts the training forward of :class:`cuda_ft.backend.TorchBackend` (decoder,
chunked head, value head: :class:`Runner`) under

- ``--parallel ddp`` (default): ``DistributedDataParallel``; every rank holds the model and
  gradients are all-reduced in backward;
- ``--parallel fsdp``: FSDP2 (``fully_shard`` on every decoder block, then on the runner):
  parameters, gradients and AdamW state are sharded over the ranks and gathered per block in
  each forward; for sampling the whole model is gathered once (:meth:`Parallel.gathered`).

Both average gradients over ranks; every loss of the algorithm layer is already its share of
the GLOBAL step, so each micro-batch's loss is multiplied by the world size before backward
and the average is the sum a single process would get. Every rank runs every pass (a rank
with no rows runs :meth:`Parallel.empty_pass`), which DDP's all-reduce and FSDP2's gathers
need. Checkpoints hold full (unsharded) tensors in the one-process format, so a run resumes
on any world size and with either ``--parallel``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from algorithms.distributed import DistributedError, World

_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
              "timed out", "Timed out", "NCCL communicator was aborted", "ProcessGroupNCCL")


class TorchWorld(World):
    """The ``torch.distributed`` process group of a ``torchrun`` job."""

    def __init__(self, cfg: Any) -> None:
        env = os.environ
        try:
            self.rank, self.size = int(env["RANK"]), int(env["WORLD_SIZE"])
            self.local_rank = int(env.get("LOCAL_RANK", 0))
        except (KeyError, ValueError) as e:
            raise DistributedError(f"torchrun environment incomplete or malformed ({e}); start "
                                   "with torchrun --nproc-per-node N -m cuda_ft ...") from None
        self.parallel = cfg.parallel
        timeout = datetime.timedelta(seconds=cfg.dist_timeout)
        cuda = torch.cuda.is_available()
        if cuda:
            if self.local_rank >= torch.cuda.device_count():
                raise DistributedError(
                    f"local rank {self.local_rank} but this host has {torch.cuda.device_count()}"
                    " CUDA GPU(s); start at most that many processes per host "
                    "(--nproc-per-node)")
            torch.cuda.set_device(self.local_rank)
        self.engine = "nccl" if cuda else "gloo"
        device = {"device_id": torch.device("cuda", self.local_rank)} if cuda else {}
        dist.init_process_group(self.engine, timeout=timeout, **device)
        # host-side sums and objects go through gloo whatever the devices
        self._group = dist.new_group(backend="gloo", timeout=timeout) if cuda else None
        self.hosts = tuple(self.gather(socket.gethostname()))

    def all_sum(self, values: Any) -> np.ndarray:
        tensor = torch.from_numpy(np.array(values, dtype=np.float64))
        dist.all_reduce(tensor, group=self._group)
        return tensor.numpy()

    def gather(self, obj: Any) -> list:
        out: list = [None] * self.size
        dist.all_gather_object(out, obj, group=self._group)
        return out

    def barrier(self) -> None:
        dist.barrier(group=self._group)

    def peer_failure(self, exc: BaseException) -> bool:
        if isinstance(exc, getattr(dist, "DistError", ())):
            return True
        return isinstance(exc, RuntimeError) and any(s in str(exc) for s in _PEER_GONE)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def init_world(cfg: Any) -> TorchWorld:
    return TorchWorld(cfg)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a collective: every rank calls it), else itself."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor every rank holds) laid out like ``param`` (sharded or not)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    value = value.to(param.device, param.dtype)
    if isinstance(param, DTensor):
        return distribute_tensor(value, param.device_mesh, param.placements)
    return value


class Runner(nn.Module):
    """The backend's forward (decoder, chunked head, value head) as one module, so DDP and
    FSDP2 see a root ``forward``; ``reference=True`` runs the reference policy."""

    def __init__(self, backend: Any) -> None:
        super().__init__()
        self.model = backend.model
        if backend.value_head is not None:
            self.value_head = backend.value_head
        object.__setattr__(self, "backend", backend)  # not a submodule

    def forward(self, batch: dict, tensors: dict, wanted: dict, reference: bool = False) -> dict:
        backend = self.backend
        if reference:
            with backend.reference.model() as model:
                return backend._outputs(batch, tensors, wanted, model)
        return backend._outputs(batch, tensors, wanted)


class Parallel:
    """How the backend's passes run in this world (module docstring); one process: as is."""

    def __init__(self, backend: Any, world: World) -> None:
        self.backend, self.world = backend, world
        self.mode = world.parallel if isinstance(world, TorchWorld) else "none"
        self.runner = Runner(backend) if self.mode != "none" else None
        self.ddp = None
        if world.size > 1:
            torch.manual_seed(backend.cfg.seed + world.rank)  # each rank its own dropout draws
        if self.mode == "ddp":
            import warnings

            from torch.nn.parallel import DistributedDataParallel

            device = [backend.device.index] if backend.device.type == "cuda" else None
            with warnings.catch_warnings():  # transformers' deprecated attribute, probed by DDP
                warnings.simplefilter("ignore", FutureWarning)
                self.ddp = DistributedDataParallel(self.runner, device_ids=device,
                                                   forward_sync_buffers=False)
        elif self.mode == "fsdp":
            self._shard()

    @property
    def sharded(self) -> bool:
        return self.mode == "fsdp"

    def _shard(self) -> None:
        """FSDP2 on every decoder block, then on the runner (embeddings, final norm, head and
        value head); one pass so the runner is FSDP's root before anything else runs."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from .model import canonical_parameters, decoder_blocks

        backend = self.backend
        dtype = backend.choice.dtype
        policy = MixedPrecisionPolicy() if dtype == torch.float32 else \
            MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        _, layers = decoder_blocks(backend.hf_model)
        for block in layers:
            fully_shard(block, mp_policy=policy)
        fully_shard(self.runner, mp_policy=policy)
        backend.params = canonical_parameters(backend.model)  # now DTensor shards
        if backend.value_head is not None:
            backend.params["v_head.weight"] = backend.value_head.weight
            backend.params["v_head.bias"] = backend.value_head.bias
        with torch.no_grad():
            self.empty_pass({"logps": False})

    # --- passes ------------------------------------------------------------------------
    def train_outputs(self, batch: dict, tensors: dict, wanted: dict) -> dict:
        if self.ddp is not None:
            return self.ddp(batch, tensors, wanted)
        if self.runner is not None:
            return self.runner(batch, tensors, wanted)
        return self.backend._outputs(batch, tensors, wanted)

    def outputs(self, batch: dict, tensors: dict, wanted: dict, reference: bool) -> dict:
        """No-grad outputs (the caller holds ``torch.no_grad``)."""
        if self.runner is not None:  # FSDP2 gathers in the root's forward; DDP is bypassed
            return self.runner(batch, tensors, wanted, reference)
        with contextlib.ExitStack() as stack:
            model = stack.enter_context(self.backend.reference.model()) if reference else None
            return self.backend._outputs(batch, tensors, wanted, model)

    def loss_scale(self) -> int:
        """DDP and FSDP2 average gradients over ranks; the losses are global shares."""
        return self.world.size if self.mode != "none" else 1

    def empty_pass(self, wanted: dict[str, bool], like: dict | None = None) -> None:
        """A rank's empty share of a pass: one padding token through the same modules, loss 0
        (DDP's all-reduce and FSDP2's gathers need every rank in every pass); the scalars of
        the empty batch ``like`` (temperature, GKD's beta) come along."""
        if self.mode == "none":
            return
        pad = self.backend.tokenizer.pad_token_id or 0
        scalars = {k: v for k, v in (like or {}).items() if np.ndim(v) == 0}
        batch = {**scalars, "input_ids": np.full((1, 1), pad, np.int32),
                 "targets": np.full((1, 1), pad, np.int32),
                 "loss_mask": np.zeros((1, 1), np.float32),
                 "segment_ids": np.ones((1, 1), np.int32)}
        tensors = self.backend._to_tensors(batch)
        if torch.is_grad_enabled() and any(wanted.values()):
            outputs = self.train_outputs(batch, tensors, wanted)
            zero = sum(v.sum() * 0.0 for v in outputs.values() if v.requires_grad)
            zero.backward()
        else:
            self.outputs(batch, tensors, dict.fromkeys(wanted, False), False)

    def grad_norm(self, params: list[torch.Tensor]) -> float:
        """Global L2 norm of the (reduced) gradients; FSDP2 shards add up over ranks."""
        from torch.distributed.tensor import DTensor

        local = sum((p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad)
                    .float().pow(2).sum() for p in params)
        squared = float(local)
        if self.sharded:
            squared = float(self.world.all_sum([squared])[0])
        return squared ** 0.5

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """FSDP2: the whole model on every rank while sampling (ranks then decode for as many
        steps as their own completions need, with no collective per step)."""
        if not self.sharded:
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in self.runner.modules() if isinstance(m, FSDPModule)]
        for unit in units:
            unit.unshard()
            unit.set_reshard_after_forward(False)
        try:
            yield
        finally:
            for unit in units:
                unit.set_reshard_after_forward(True)
                unit.reshard()

    # --- state -------------------------------------------------------------------------
    def full_state(self, params: dict[str, torch.Tensor], optimizer: Any) -> tuple[dict, dict]:
        """Trainable weights and AdamW state as whole CPU tensors, in the one-process layout
        (every rank calls it: FSDP2 gathers)."""
        weights = {k: full(p.detach()).cpu().contiguous() for k, p in params.items()}
        state = optimizer.state_dict()
        state["state"] = {i: {k: full(v).cpu() if torch.is_tensor(v) else v
                              for k, v in s.items()} for i, s in state["state"].items()}
        return weights, state

    def load_optimizer(self, optimizer: Any, state: dict, params: list[torch.Tensor]) -> None:
        """AdamW state saved whole, laid out like each parameter (sharded under FSDP2)."""
        if self.sharded:
            for index, entry in state["state"].items():
                param = params[int(index)]
                for key, value in entry.items():
                    if torch.is_tensor(value) and value.shape == param.shape:
                        entry[key] = shard_like(value, param)
        optimizer.load_state_dict(state)

    def rng_states(self) -> list:
        """Every rank's RNG states (CPU, and this rank's GPU), in rank order."""
        mine = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            mine["cuda_device"] = torch.cuda.get_rng_state()
        return self.world.gather(mine) if self.world.size > 1 else [mine]

    def set_rng(self, saved: dict) -> None:
        """This rank's RNG from a checkpoint (``ranks`` when one was saved per rank)."""
        ranks = saved.get("ranks") or []
        if self.world.size == 1 or self.world.rank >= len(ranks):
            if self.world.size > 1:  # resumed on more ranks than saved: a fresh seed
                torch.manual_seed(self.backend.cfg.seed + self.world.rank)
                return
            torch.set_rng_state(saved["cpu"])
            if "cuda" in saved and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(saved["cuda"])
            return
        torch.set_rng_state(ranks[self.world.rank]["cpu"])
        if "cuda_device" in ranks[self.world.rank] and torch.cuda.is_available():
            torch.cuda.set_rng_state(ranks[self.world.rank]["cuda_device"])

    def adapter_state(self) -> dict[str, torch.Tensor] | None:
        """FSDP2: the model's state dict as whole tensors (trainable ones only for adapters),
        for ``save_pretrained(state_dict=...)``; None otherwise."""
        if not self.sharded:
            return None
        full_model = self.backend.cfg.fine_tune_type == "full"
        items = self.backend.model.state_dict().items() if full_model else \
            ((k, p) for k, p in self.backend.model.named_parameters() if p.requires_grad)
        return {k: full(v.detach()).cpu() for k, v in items}
