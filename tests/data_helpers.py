"""The config the data-layer tests hand ``prepare_splits``: every data option at its default."""

from __future__ import annotations

import types


def data_cfg(data, **overrides) -> types.SimpleNamespace:
    """A config for ``data`` (a path, or a list of ``--data`` entries) with TrainConfig's data
    defaults (one process, no cache) and ``overrides``."""
    base = {"data": data if isinstance(data, list) else [str(data)], "max_length": 64,
            "train_on": "auto", "skip_invalid": False, "seed": 0, "valid_fraction": 0.0,
            "data_format": "auto", "columns": [], "data_split": "train", "data_config": "",
            "data_workers": 1, "data_cache": False, "packing": False, "max_prompt_length": None,
            "max_completion_length": 16}
    base.update(overrides)
    return types.SimpleNamespace(**base)
