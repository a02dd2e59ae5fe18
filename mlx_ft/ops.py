"""The array-ops shim (algorithms.ops.ArrayOps) for MLX arrays."""

from __future__ import annotations

import mlx.core as mx
from mlx import nn

from . import precise

_DTYPES = {"float32": mx.float32, "int32": mx.int32, "bool": mx.bool_}


class MLXOps:
    def asarray(self, x, dtype="float32"):
        return mx.array(x, dtype=_DTYPES[dtype])

    exp = staticmethod(mx.exp)
    log = staticmethod(mx.log)
    log1p = staticmethod(mx.log1p)
    expm1 = staticmethod(mx.expm1)
    log_sigmoid = staticmethod(nn.log_sigmoid)
    sigmoid = staticmethod(mx.sigmoid)
    abs = staticmethod(mx.abs)
    square = staticmethod(mx.square)
    maximum = staticmethod(mx.maximum)
    minimum = staticmethod(mx.minimum)
    where = staticmethod(mx.where)
    stop_gradient = staticmethod(mx.stop_gradient)

    def clip(self, x, low, high):
        return mx.clip(x, low, high)

    def sum(self, x, axis=None):
        return mx.sum(x, axis=axis)

    def mean(self, x, axis=None):
        return mx.mean(x, axis=axis)

    def logsumexp(self, x, axis=-1):
        return precise.logsumexp(x, axis=axis)

    def cumsum(self, x, axis):
        return mx.cumsum(x, axis=axis)

    def sort(self, x, axis=-1):
        return mx.sort(x, axis=axis)

    def to_float(self, x):
        return float(x.item())
