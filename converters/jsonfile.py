"""The small JSON files of model and adapter dirs (config.json, adapter_config.json...)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; a ValueError naming the file when it is not one."""
    try:
        data = json.loads(Path(path).read_text())
    except ValueError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")  # noqa: TRY004 (CLI reports ValueError)
    return data
