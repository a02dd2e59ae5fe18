"""The array-ops shim: the few array operations a loss needs, provided by each backend.

Losses in ``algorithms/`` are written once against this interface and receive the backend's
implementation as their first argument (``ops``). ``mlx_ft.ops.MLXOps`` and
``cuda_ft.ops.TorchOps`` implement it; :class:`NumpyOps` below is the reference used by tests to
compute expected values without a framework.

Axis arguments follow numpy: ``axis=None`` reduces over everything.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class ArrayOps(Protocol):
    def asarray(self, x: Any, dtype: str = "float32") -> Any: ...
    def exp(self, x: Any) -> Any: ...
    def log(self, x: Any) -> Any: ...
    def log1p(self, x: Any) -> Any: ...
    def expm1(self, x: Any) -> Any: ...
    def log_sigmoid(self, x: Any) -> Any: ...
    def sigmoid(self, x: Any) -> Any: ...
    def abs(self, x: Any) -> Any: ...
    def square(self, x: Any) -> Any: ...
    def maximum(self, x: Any, y: Any) -> Any: ...
    def minimum(self, x: Any, y: Any) -> Any: ...
    def clip(self, x: Any, low: float | None, high: float | None) -> Any: ...
    def where(self, cond: Any, x: Any, y: Any) -> Any: ...
    def sum(self, x: Any, axis: int | None = None) -> Any: ...
    def mean(self, x: Any, axis: int | None = None) -> Any: ...
    def logsumexp(self, x: Any, axis: int = -1) -> Any: ...
    def cumsum(self, x: Any, axis: int) -> Any: ...
    def sort(self, x: Any, axis: int = -1) -> Any: ...
    def stop_gradient(self, x: Any) -> Any: ...
    def to_float(self, x: Any) -> float: ...


class NumpyOps:
    """Reference implementation in float64 numpy (no gradients)."""

    def asarray(self, x, dtype="float32"):
        return np.asarray(x, dtype=np.float64 if dtype.startswith("float") else dtype)

    def exp(self, x):
        return np.exp(x)

    def log(self, x):
        return np.log(x)

    def log1p(self, x):
        return np.log1p(x)

    def expm1(self, x):
        return np.expm1(x)

    def log_sigmoid(self, x):
        return -np.logaddexp(0.0, -np.asarray(x, dtype=np.float64))

    def sigmoid(self, x):
        return np.exp(self.log_sigmoid(x))

    def abs(self, x):
        return np.abs(x)

    def square(self, x):
        return np.square(x)

    def maximum(self, x, y):
        return np.maximum(x, y)

    def minimum(self, x, y):
        return np.minimum(x, y)

    def clip(self, x, low, high):
        return np.clip(x, low, high)

    def where(self, cond, x, y):
        return np.where(cond, x, y)

    def sum(self, x, axis=None):
        return np.sum(x, axis=axis)

    def mean(self, x, axis=None):
        return np.mean(x, axis=axis)

    def logsumexp(self, x, axis=-1):
        x = np.asarray(x, dtype=np.float64)
        top = np.max(x, axis=axis, keepdims=True)
        return np.squeeze(top, axis=axis) + np.log(np.sum(np.exp(x - top), axis=axis))

    def cumsum(self, x, axis):
        return np.cumsum(x, axis=axis)

    def sort(self, x, axis=-1):
        return np.sort(x, axis=axis)

    def stop_gradient(self, x):
        return x

    def to_float(self, x):
        return float(x)
