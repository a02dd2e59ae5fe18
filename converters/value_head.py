"""The PPO value head beside an adapter (``value_head.safetensors``, the same file for mlx-lm and
PEFT adapters): read and checked against a base, and carried into an output dir by the adapter
conversions and ``fuse``."""

from __future__ import annotations

from pathlib import Path


def read_value_head(adapter_dir: str | Path, hidden_size: int | None = None) -> dict | None:
    """The PPO value head saved beside an adapter (``value_head.safetensors``: the same file
    for mlx-lm and PEFT adapters), checked against the base's hidden size when known; None when
    the adapter has none."""
    from algorithms.backend import VALUE_HEAD_FILE, load_value_head

    head = load_value_head(adapter_dir)
    if head is not None and hidden_size is not None \
            and head["v_head.weight"].shape[1] != hidden_size:
        raise ValueError(f"{Path(adapter_dir) / VALUE_HEAD_FILE}: a value head for hidden size "
                         f"{head['v_head.weight'].shape[1]}, the base has {hidden_size}")
    return head


def write_value_head(directory: Path, head: dict | None) -> None:
    """Carry a value head into an output dir (nothing when there is none)."""
    if head is not None:
        from algorithms.backend import save_value_head

        save_value_head(directory, head)
