"""Activation checkpointing per transformer block (``--grad-checkpoint``) on the MLX backend.

Each block of ``model.layers`` is re-classed in place (a subclass of its own class, so weights,
names and saved adapters are untouched; other models in the process are not affected, unlike
patching the class itself) so that calling it runs under ``mx.checkpoint``: the backward pass
keeps the block's input and calls the block again to rebuild what it needs. The padding-free
path (:mod:`mlx_ft.varlen`), which runs a block's attention and MLP itself, goes through
:func:`run_block` for the same effect.

LoRA dropout draws from MLX's global random key. The recomputation restores the key the forward
pass started from (and puts back the key it found), so it draws the same mask and the random
stream after the step is the one an uncheckpointed step leaves: the numbers do not change.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
from mlx import nn

_SUBCLASSES: dict[type, type] = {}


def run_block(layer: nn.Module, fn: Callable[[mx.array], mx.array], x: mx.array) -> mx.array:
    """``fn(x)`` (one block of ``layer``), checkpointed when ``layer`` was enabled."""
    if not getattr(layer, "posttrain_checkpoint", False):
        return fn(x)
    start_key = _key()
    calls = [0]

    def inner(params, x):
        layer.update(params)
        calls[0] += 1
        if calls[0] == 1:  # the forward pass: the random stream advances as usual
            return fn(x)
        found = _key()
        mx.random.seed(start_key)
        try:
            return fn(x)
        finally:
            mx.random.seed(found)

    return mx.checkpoint(inner)(layer.trainable_parameters(), x)


def _key() -> int:
    """MLX's global random key as the integer ``mx.random.seed`` turns back into it."""
    high, low = (int(v) for v in mx.random.state[0].tolist())
    return (high << 32) | low


class _CheckpointedCall:
    posttrain_checkpoint = True

    def __call__(self, x, *args, **kwargs):
        call = super().__call__
        return run_block(self, lambda h: call(h, *args, **kwargs), x)


def enable(model: nn.Module, blocks: list[int] | None = None) -> int:
    """Checkpoint the ``blocks`` (indices; None: all) of ``model.layers``; returns how many."""
    layers = model.layers
    chosen = range(len(layers)) if blocks is None else blocks
    for layer in (layers[i] for i in chosen):
        cls = type(layer)
        if cls not in _SUBCLASSES and not issubclass(cls, _CheckpointedCall):
            _SUBCLASSES[cls] = type(f"Checkpointed{cls.__name__}", (_CheckpointedCall, cls), {})
        if not issubclass(cls, _CheckpointedCall):
            layer.__class__ = _SUBCLASSES[cls]
    return len(chosen)
