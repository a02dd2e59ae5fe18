"""TorchOps: the array-ops shim of :mod:`algorithms.ops` for torch tensors.

Losses in ``algorithms/`` are written once against :class:`algorithms.ops.ArrayOps`; this class
is what they receive on the torch backend. Every method is differentiable where the math is
(``stop_gradient`` is ``detach``), follows numpy's axis convention (``axis=None`` reduces over
everything) and accepts Python scalars where numpy would, so a loss never has to know which
framework it runs on.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a numpy-style dtype name ("float32", "int64", ...)."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(_DTYPES)}") from None


class TorchOps:
    """Array operations on torch tensors; new tensors are created on ``device``.

    The device matters for ``asarray``: a loss that builds a constant array (a reward vector, a
    reference log-prob) must get it on the same device as the model's log-probs.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)

    # constructors -------------------------------------------------------------------------
    def asarray(self, x: Any, dtype: str = "float32") -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            return x.to(dtype=torch_dtype(dtype))
        return torch.as_tensor(x, dtype=torch_dtype(dtype), device=self.device)

    def _t(self, x: Any) -> torch.Tensor:
        """``x`` itself when it is a tensor, else a float32 tensor on ``self.device``."""
        return x if isinstance(x, torch.Tensor) else self.asarray(x)

    def _pair(self, x: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Both operands as tensors; a Python scalar takes the dtype and device of the other."""
        if not isinstance(x, torch.Tensor) and not isinstance(y, torch.Tensor):
            return self.asarray(x), self.asarray(y)
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(x, dtype=y.dtype, device=y.device)
        if not isinstance(y, torch.Tensor):
            y = torch.as_tensor(y, dtype=x.dtype, device=x.device)
        return x, y

    # elementwise --------------------------------------------------------------------------
    def exp(self, x: Any) -> torch.Tensor:
        return torch.exp(self._t(x))

    def log(self, x: Any) -> torch.Tensor:
        return torch.log(self._t(x))

    def log1p(self, x: Any) -> torch.Tensor:
        return torch.log1p(self._t(x))

    def expm1(self, x: Any) -> torch.Tensor:
        return torch.expm1(self._t(x))

    def log_sigmoid(self, x: Any) -> torch.Tensor:
        return F.logsigmoid(self._t(x))

    def sigmoid(self, x: Any) -> torch.Tensor:
        return torch.sigmoid(self._t(x))

    def abs(self, x: Any) -> torch.Tensor:
        return torch.abs(self._t(x))

    def square(self, x: Any) -> torch.Tensor:
        return torch.square(self._t(x))

    def maximum(self, x: Any, y: Any) -> torch.Tensor:
        return torch.maximum(*self._pair(x, y))

    def minimum(self, x: Any, y: Any) -> torch.Tensor:
        return torch.minimum(*self._pair(x, y))

    def clip(self, x: Any, low: float | None, high: float | None) -> torch.Tensor:
        x = self._t(x)
        if low is None and high is None:
            return x
        return torch.clamp(x, min=low, max=high)

    def where(self, cond: Any, x: Any, y: Any) -> torch.Tensor:
        cond = cond if isinstance(cond, torch.Tensor) else torch.as_tensor(cond, device=self.device)
        if cond.dtype != torch.bool:
            cond = cond != 0  # numpy semantics: any non-zero value is true
        x, y = self._pair(x, y)
        return torch.where(cond, x, y)

    # reductions ---------------------------------------------------------------------------
    def sum(self, x: Any, axis: int | None = None) -> torch.Tensor:
        x = self._t(x)
        return x.sum() if axis is None else x.sum(dim=axis)

    def mean(self, x: Any, axis: int | None = None) -> torch.Tensor:
        x = self._t(x)
        return x.mean() if axis is None else x.mean(dim=axis)

    def logsumexp(self, x: Any, axis: int = -1) -> torch.Tensor:
        return torch.logsumexp(self._t(x), dim=axis)

    def cumsum(self, x: Any, axis: int) -> torch.Tensor:
        return torch.cumsum(self._t(x), dim=axis)

    def sort(self, x: Any, axis: int = -1) -> torch.Tensor:
        return torch.sort(self._t(x), dim=axis).values

    # autograd and host ---------------------------------------------------------------------
    def stop_gradient(self, x: Any) -> Any:
        return x.detach() if isinstance(x, torch.Tensor) else x

    def to_float(self, x: Any) -> float:
        return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)
