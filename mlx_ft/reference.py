"""The reference policy for preference / RL losses, without a second copy when it can be avoided.

- LoRA / DoRA runs: the base model itself, by swapping every adapter layer for the plain layer it
  wraps for the duration of the call (``adapters_disabled``); the result is exactly the base
  model's output (not "scale = 0": DoRA's learned magnitude would still act).
- full fine-tuning: a frozen copy of the starting weights, loaded once on first use;
- ``--ref-model PATH``: that model, loaded once, frozen.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlx import nn
from mlx.utils import tree_unflatten

from algorithms.backend import reference_kind


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    wrapped = [(name, m) for name, m in model.named_modules() if hasattr(m, "lora_a")]
    model.update_modules(tree_unflatten([(name, m.linear) for name, m in wrapped]))
    try:
        yield model
    finally:
        model.update_modules(tree_unflatten(wrapped))


class Reference:
    """Yields the module to run as the reference policy (``with reference.model() as m:``)."""

    def __init__(self, policy: nn.Module, cfg: Any, model_path: Path, dtype: Any):
        self.policy, self.cfg, self.model_path, self.dtype = policy, cfg, model_path, dtype
        self._frozen: nn.Module | None = None

    @property
    def kind(self) -> str:
        return reference_kind(self.cfg)

    @contextmanager
    def model(self) -> Iterator[nn.Module]:
        if self.kind == "adapters_disabled":
            with adapters_disabled(self.policy) as m:
                yield m
            return
        if self._frozen is None:
            path = self.cfg.reference_model if self.kind == "ref_model" else self.model_path
            self._frozen = load_frozen(path, self.dtype)
        yield self._frozen


def load_frozen(path: str | Path, dtype: Any) -> nn.Module:
    """A model dir (or short name) loaded frozen and in eval mode: a reference or a teacher."""
    from converters.models import resolve_model

    from .model import load_model

    model, _ = load_model(Path(resolve_model(str(path))), dtype)
    model.freeze()
    model.eval()
    return model
