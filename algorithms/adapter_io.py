"""Adapters a run starts from or a verb runs with: read from either format, backend-free.

Two uses, both through :func:`read_adapter_weights` (an mlx-lm or a PEFT adapter dir, read
with :mod:`converters.adapters`, so either backend takes either format):

- ``--adapter DIR`` of ``evaluate`` / ``generate`` / ``chat``: the adapter's settings (LoRA or
  DoRA, rank, alpha, modules) become the run's (:func:`adopt_settings`) and its weights are
  loaded into the backend's adapter layers (``backend.load_adapter_weights``).
- ``--init-adapter DIR`` of training: the adapter is kept FROZEN and a new adapter is trained on
  top of it, so the policy is ``W + s1 B1 A1 + s2 B2 A2`` and the reference of DPO / KTO / the
  online KL is the starting point ``W + s1 B1 A1`` (the new adapter disabled) - exactly what
  training on the fused model would do, without a fused copy. The adapter saved at the end is
  the two in one standard LoRA of rank ``r1 + r2`` (:func:`stack`):
  ``A = [A1; A2]``, ``B = [B1 * s1 / s2, B2]``, scale ``s2``, since
  ``s2 [B1 s1/s2, B2] [A1; A2] = s1 B1 A1 + s2 B2 A2``; mlx-lm and PEFT load it on the base.
  LoRA only: a DoRA adapter rescales whole rows and has no such sum (fuse it first).

Canonical names and layouts (PEFT's, shared by both backends): ``{module}.lora_A`` ``[r, in]``,
``{module}.lora_B`` ``[out, r]``, ``{module}.magnitude`` ``[out]``; modules are Hugging Face paths
(``model.layers.3.self_attn.q_proj``).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import numpy as np

BLOCK = re.compile(r"^model\.layers\.\d+\.(?P<key>.+)$")


@dataclasses.dataclass
class AdapterWeights:
    path: Path
    fmt: str             # "mlx" | "peft"
    fine_tune_type: str  # "lora" | "dora"
    rank: int
    scale: float
    weights: dict[str, np.ndarray]  # canonical names, float32
    value_head: dict[str, np.ndarray] | None

    @property
    def alpha(self) -> float:
        return self.scale * self.rank

    @property
    def modules(self) -> list[str]:
        return sorted({k.rsplit(".", 1)[0] for k in self.weights})

    @property
    def block_keys(self) -> list[str]:
        """Block-relative module paths (``self_attn.q_proj``): the ``--target-modules``."""
        return sorted({m["key"] for p in self.modules if (m := BLOCK.match(p))})


def read_adapter_weights(directory: str | Path, flag: str,
                         model_path: str | Path | None = None) -> AdapterWeights:
    """The adapter in ``directory`` (either format) as canonical float32 arrays; a ValueError
    naming ``flag`` when it is not an adapter, or (with ``model_path``) does not fit the model."""
    from converters.adapters import read_adapter, read_value_head
    from converters.fuse import read_base_model, to_f32

    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{flag} {directory}: no such directory")
    if (directory / "config.json").is_file() and not (directory / "adapter_config.json").is_file():
        raise ValueError(f"{flag} {directory}: a complete model dir (a full fine-tune), not an "
                         "adapter: pass it as --model")
    try:
        adapter = read_adapter(directory)
        hidden = None
        if model_path is not None:
            from converters.fingerprint import check_base_record

            base = read_base_model(model_path)
            check_base_record(directory, model_path, base.config, ignore_fingerprint=True)
            base.check_adapter(adapter)
            hidden = base.config.get("hidden_size")
        head = read_value_head(directory, hidden)
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise ValueError(f"{flag} {directory}: {e}") from None
    leaf = {"A": "lora_A", "B": "lora_B", "m": "magnitude"}
    weights = {f"{path}.{leaf[name]}": to_f32(adapter.oriented(path, name, "peft"))
               for path, parts in adapter.modules.items() for name in parts}
    return AdapterWeights(directory, adapter.fmt, adapter.fine_tune_type, adapter.rank,
                          float(adapter.scale), weights, head)


def adopt_settings(cfg: Any, adapter: AdapterWeights) -> None:
    """Make ``cfg``'s adapter options those of ``adapter`` (so the backend builds layers its
    weights fit): type, rank, alpha, target modules."""
    cfg.fine_tune_type = adapter.fine_tune_type
    cfg.lora_rank = adapter.rank
    cfg.lora_alpha = adapter.alpha
    cfg.target_modules = adapter.block_keys


def check_init_adapter(cfg: Any, model_path: str | Path) -> AdapterWeights | None:
    """``--init-adapter`` read and checked against the run (None without one)."""
    if not getattr(cfg, "init_adapter", ""):
        return None
    if cfg.fine_tune_type != "lora":
        raise ValueError(f"--init-adapter with --fine-tune-type {cfg.fine_tune_type}: the "
                         "initial adapter stays frozen under a new LoRA adapter; use "
                         "--fine-tune-type lora, or fuse the adapter into the model first "
                         "(python -m converters fuse) and train that")
    adapter = read_adapter_weights(cfg.init_adapter, "--init-adapter", model_path)
    if adapter.fine_tune_type != "lora":
        raise ValueError(f"--init-adapter {cfg.init_adapter}: a DoRA adapter rescales whole "
                         "weight rows, so it cannot stay a separate frozen adapter; fuse it "
                         "into the model first (python -m converters fuse) and train that")
    return adapter


def deltas(adapter: AdapterWeights) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{module: (A [r, in], B [out, r] * scale)}``: ``W + B A`` is the adapted weight."""
    return {m: (adapter.weights[f"{m}.lora_A"],
                adapter.weights[f"{m}.lora_B"] * np.float32(adapter.scale))
            for m in adapter.modules}


def stack(init: AdapterWeights, trained: dict[str, np.ndarray], rank: int,
          scale: float) -> dict[str, np.ndarray]:
    """The frozen ``init`` adapter and the ``trained`` one (canonical LoRA weights of rank
    ``rank`` and scale ``scale``) as one LoRA of rank ``init.rank + rank`` and scale ``scale``
    (module docstring); a module only one of them adapts gets zeros for the other's rows."""
    modules = sorted(set(init.modules) | {k.rsplit(".", 1)[0] for k in trained
                                           if k.endswith((".lora_A", ".lora_B"))})
    out = {}
    ratio = np.float32(init.scale / scale)
    for m in modules:
        a1, b1 = init.weights.get(f"{m}.lora_A"), init.weights.get(f"{m}.lora_B")
        a2, b2 = trained.get(f"{m}.lora_A"), trained.get(f"{m}.lora_B")
        shape_a = (a1 if a1 is not None else a2).shape[1]
        shape_b = (b1 if b1 is not None else b2).shape[0]
        a1 = a1 if a1 is not None else np.zeros((init.rank, shape_a), np.float32)
        b1 = b1 * ratio if b1 is not None else np.zeros((shape_b, init.rank), np.float32)
        a2 = a2 if a2 is not None else np.zeros((rank, shape_a), np.float32)
        b2 = b2 if b2 is not None else np.zeros((shape_b, rank), np.float32)
        out[f"{m}.lora_A"] = np.concatenate([a1, a2], axis=0).astype(np.float32)
        out[f"{m}.lora_B"] = np.concatenate([b1, b2], axis=1).astype(np.float32)
    return out
