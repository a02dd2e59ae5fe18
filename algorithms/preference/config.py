"""Options shared by the preference algorithms (the per-algorithm configs extend these)."""

from __future__ import annotations

import dataclasses

from ..config import TrainConfig, _bad, field


@dataclasses.dataclass
class PreferenceConfig(TrainConfig):
    """Options of every preference algorithm: the data are prompt + response pairs."""

    max_prompt_length: int = field(
        0, "keep only the last N prompt tokens before --max-length applies; 0 = no limit")

    def validate(self) -> None:
        super().validate()
        if self.max_prompt_length < 0:
            _bad("max_prompt_length", self.max_prompt_length, "must be >= 0")
        if self.packing:
            _bad("packing", True, "is not supported for preference data (chosen and rejected "
                 "rows are padded side by side)")


@dataclasses.dataclass
class ReferenceConfig(PreferenceConfig):
    """Options of the algorithms that compare the policy with a reference (DPO, KTO)."""

    ref_model: str = field(
        "", "reference model (dir or short name); empty = the starting model: the base with "
        "adapters disabled for LoRA/DoRA (no second copy), a frozen copy for full fine-tuning")
    precompute_ref: bool = field(
        False, "compute reference log-probs once before training and cache them beside the data "
        "(.posttrain_cache/, keyed by model and data; reused on rerun)")

    @property
    def reference_model(self) -> str:
        return self.ref_model

    @property
    def needs_reference(self) -> bool:
        """Whether the batch must carry ``ref_per_token_logps``."""
        return True
