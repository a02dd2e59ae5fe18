"""The reference policy for preference / RL losses, without a second copy when it can be avoided.

- LoRA / DoRA runs: the base model itself, through PEFT's ``disable_adapter()`` (the adapter
  layers return the wrapped layer's output exactly);
- full fine-tuning: a frozen copy of the starting weights, loaded once on first use;
- ``--ref-model PATH``: that model, loaded once, frozen.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from algorithms.backend import reference_kind


class Reference:
    """Yields the HF model to run as the reference policy (``with reference.model() as m:``)."""

    def __init__(self, policy: torch.nn.Module, hf_model: torch.nn.Module, cfg: Any,
                 model_path: Path, choice: Any):
        self.policy, self.hf_model, self.cfg = policy, hf_model, cfg
        self.model_path, self.choice = model_path, choice
        self._frozen: torch.nn.Module | None = None

    @property
    def kind(self) -> str:
        return reference_kind(self.cfg)

    @contextmanager
    def model(self) -> Iterator[torch.nn.Module]:
        if self.kind == "adapters_disabled":
            with self.policy.disable_adapter():
                yield self.hf_model
            return
        if self._frozen is None:
            path = self.cfg.reference_model if self.kind == "ref_model" else self.model_path
            self._frozen = load_frozen(path, self.choice)
        yield self._frozen


def load_frozen(path: str | Path, choice: Any) -> torch.nn.Module:
    """A model dir (or short name) loaded frozen, in eval mode, in the compute dtype on the
    device of ``choice``: a reference or a teacher."""
    from transformers import AutoModelForCausalLM

    from converters.models import resolve_model

    frozen = AutoModelForCausalLM.from_pretrained(str(resolve_model(str(path))),
                                                  dtype=torch.float32)
    frozen.requires_grad_(False)
    if choice.dtype != torch.float32:
        frozen.to(choice.dtype)
    return frozen.to(choice.device).eval()
