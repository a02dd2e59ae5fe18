"""The torch backend's files: the resumable training state (trainable weights by canonical
name, AdamW, the RNG states) and the saved adapter (a PEFT dir, or a full model dir for full
fine-tuning), whole tensors whatever the sharding. :class:`cuda_ft.backend.TorchBackend`'s
``save_state`` / ``load_state`` / ``save_adapters`` call these with itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from algorithms.adapter_io import stack
from algorithms.backend import VALUE_HEAD_KEYS, save_value_head
from converters.fingerprint import write_base_record

from .distributed import shard_like

_WEIGHTS = "trainable.safetensors"
_OPTIMIZER = "optimizer.pt"
_RNG = "rng.pt"


def save_state(backend: Any, directory: str | None) -> None:
    """Trainable weights (canonical names), AdamW state, and the CPU/CUDA RNG states, whole
    tensors whatever the sharding. Every rank of a distributed run calls it; ranks other
    than 0 pass None (they take part in the gathers and write nothing)."""
    from safetensors.torch import save_file

    weights, optimizer = backend.parallel.full_state(backend.params, backend.optimizer)
    ranks = backend.parallel.rng_states()
    if directory is None:
        return
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(path / _WEIGHTS))
    torch.save(optimizer, path / _OPTIMIZER)
    rng = {"cpu": torch.get_rng_state(), **({"ranks": ranks} if len(ranks) > 1 else {})}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, path / _RNG)


def load_state(backend: Any, directory: str) -> None:
    from safetensors.torch import load_file

    path = Path(directory)
    weights = load_file(str(path / _WEIGHTS))
    missing = sorted(set(backend.params) - set(weights))
    extra = sorted(set(weights) - set(backend.params))
    if missing or extra:
        raise ValueError(f"{path / _WEIGHTS}: does not match this model's trainable "
                         f"parameters (missing {missing[:3]}, unexpected {extra[:3]})")
    with torch.no_grad():
        for name, param in backend.params.items():
            param.copy_(shard_like(weights[name], param))
    optimizer = torch.load(path / _OPTIMIZER, map_location=backend.device)
    backend.parallel.load_optimizer(backend.optimizer, optimizer, list(backend.params.values()))
    backend.parallel.set_rng(torch.load(path / _RNG, weights_only=True))


def save_adapters(backend: Any, directory: str | None) -> None:
    """PEFT adapter dir for lora/dora; a full HF model dir (with tokenizer) for full; both
    with the run's ``chat_template.jinja``, and the value head beside them when the run has
    one. Distributed: every rank calls it, ranks other than 0 with None."""
    from algorithms.data.templates import save_chat_template

    params = backend.trainable_parameters() if backend.value_head is not None or \
        backend.init_adapter is not None else {}
    state = backend.parallel.adapter_state()  # FSDP2: whole tensors (a gather)
    if directory is None:
        return
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    save_chat_template(path, backend.tokenizer)
    backend.model.save_pretrained(str(path), **({} if state is None else {"state_dict": state}))
    if backend.cfg.fine_tune_type == "full":
        backend.tokenizer.save_pretrained(str(path))
    else:
        if backend.init_adapter is not None:
            _stack_init_adapter(backend, path, params)
        write_base_record(path, backend.model_path)  # fuse refuses it on another base
    if backend.value_head is not None:
        save_value_head(path, {k: params[k] for k in VALUE_HEAD_KEYS})


def _stack_init_adapter(backend: Any, path: Path, params: dict[str, np.ndarray]) -> None:
    """Rewrite the saved PEFT adapter as the initial adapter and the trained one in one LoRA
    of rank r1 + r2 (algorithms.adapter_io.stack), which PEFT loads on the base."""
    import json

    from safetensors.numpy import save_file

    trained = {k: v for k, v in params.items() if not k.startswith("v_head.")}
    scale = backend.cfg.lora_alpha / backend.cfg.lora_rank
    stacked = stack(backend.init_adapter, trained, backend.cfg.lora_rank, scale)
    save_file({f"base_model.model.{k}.weight": v for k, v in stacked.items()},
              str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = json.loads((path / "adapter_config.json").read_text())
    rank = backend.cfg.lora_rank + backend.init_adapter.rank
    modules = sorted({k.rsplit(".", 1)[0].rsplit(".", 1)[1] for k in stacked})
    config.update(r=rank, lora_alpha=scale * rank, target_modules=modules,
                  layers_to_transform=None)
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
