"""The algorithms each backend's CLI offers: name -> (config class, loss factory, one-line help).

A new algorithm is one module in ``algorithms/`` plus one line here; the loop and both CLIs pick it
up without branching on its name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class Algorithm:
    name: str
    config_cls: type
    make_loss: Callable
    summary: str


def algorithms() -> dict[str, Algorithm]:
    from . import sft

    return {
        "sft": Algorithm("sft", sft.SFTConfig, sft.make_loss,
                         "supervised fine-tuning (losses: nll, dft)"),
    }
