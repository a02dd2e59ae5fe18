"""LoRA / DoRA adapters: mlx-lm <-> PEFT, both directions, bit-exact.

What each library computes for an adapted linear layer (``W [out, in]``, bias ``b``, input ``x``):

- mlx-lm ``LoRALinear``:  ``y = x W^T + b + scale * (x @ lora_a) @ lora_b``,
  ``lora_a [in, r]``, ``lora_b [r, out]``, ``scale`` from ``lora_parameters.scale``.
- PEFT ``lora.Linear``:   ``y = x W^T + b + scaling * x A^T B^T``, ``A = lora_A [r, in]``,
  ``B = lora_B [out, r]``, ``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with use_rslora).
- DoRA, both libraries: ``y = (m / n) * (x W^T + s * x A^T B^T) + b`` with
  ``n = ||W + s * B A||`` over the input axis (one norm per output row, not back-propagated) and
  the magnitude ``m [out]`` stored as is: it does not include the scale. mlx-lm calls it ``m``,
  PEFT ``lora_magnitude_vector`` (PEFT writes ``(m/n - 1) * x W^T + (m/n) * s * x A^T B^T`` on top
  of the base output: the same number).

So ``lora_a = A^T``, ``lora_b = B^T``, ``m = lora_magnitude_vector`` and
``scale = lora_alpha / r`` (or ``/ sqrt(r)``); the key map is :data:`LEAVES` below, read one way or
the other. Module paths are mlx-lm model paths, equal to the Hugging Face ones for the model types
in ``converters.fuse.SUPPORTED_MODEL_TYPES``; only adapters on linear layers inside the decoder
blocks (``model.layers.N.*``) convert. mlx-lm adapts the same ``lora_parameters.keys``
(block-relative paths) in the last ``num_layers`` blocks (-1: all); PEFT's ``layers_to_transform``
says the same when it lists a final run of blocks, otherwise the adapter has no mlx-lm form and is
refused. Key names, dtypes and bytes survive a round trip exactly (transposes move bytes only).

Mapping (PEFT key = ``base_model.model.`` + mlx-lm key stem):

| mlx-lm                      | PEFT                                   | layout                  |
|-----------------------------|----------------------------------------|-------------------------|
| ``{path}.lora_a`` [in, r]   | ``{path}.lora_A.weight`` [r, in]       | transpose               |
| ``{path}.lora_b`` [r, out]  | ``{path}.lora_B.weight`` [out, r]      | transpose               |
| ``{path}.m`` [out]          | ``{path}.lora_magnitude_vector`` [out] | same (DoRA only)        |
| ``lora_parameters.rank``    | ``r``                                  | same                    |
| ``lora_parameters.scale``   | ``lora_alpha / r`` (rslora: sqrt(r))   | alpha = scale * r back  |
| ``lora_parameters.dropout`` | ``lora_dropout``                       | same                    |
| ``lora_parameters.keys``    | ``target_modules``                     | block-relative paths    |
| ``num_layers`` (-1: all)    | ``layers_to_transform`` (None: all)    | last N blocks           |
| ``fine_tune_type`` dora     | ``use_dora``                           |                         |
| ``model``                   | ``base_model_name_or_path``            |                         |
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .atomic import atomic_output_dir, check_output_dir
from .fuse import CHAT_TEMPLATE, Stored, read_tensors, write_tensors
from .jsonfile import read_json_object
from .value_head import read_value_head, write_value_head

MLX_WEIGHTS, PEFT_WEIGHTS = "adapters.safetensors", "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
BLOCK_PATH = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?P<key>.+)$")


class Leaf(NamedTuple):
    name: str  # canonical (PEFT orientation) name used by fuse
    mlx: str
    peft: str
    transpose: bool  # the two layouts are transposes of each other


LEAVES = (
    Leaf("A", "lora_a", "lora_A.weight", True),  # mlx [in, r]  <-> peft [r, in]
    Leaf("B", "lora_b", "lora_B.weight", True),  # mlx [r, out] <-> peft [out, r]
    Leaf("m", "m", "lora_magnitude_vector", False),  # DoRA magnitude [out], same both sides
)


def split_key(key: str, fmt: str) -> tuple[str, Leaf] | None:
    """``(module path, leaf)`` of an adapter tensor key in ``fmt`` ("mlx" or "peft"), else None."""
    for leaf in LEAVES:
        suffix = "." + getattr(leaf, fmt)
        if key.endswith(suffix):
            path = key[: -len(suffix)]
            if fmt == "peft":
                if not path.startswith(PEFT_PREFIX):
                    return None
                path = path[len(PEFT_PREFIX):]
            return path, leaf
    return None


def join_key(path: str, leaf: Leaf, fmt: str) -> str:
    return f"{PEFT_PREFIX if fmt == 'peft' else ''}{path}.{getattr(leaf, fmt)}"


# --- one adapter directory, read and checked -------------------------------------------------
@dataclass
class Adapter:
    """An adapter as stored (``fmt`` "mlx" or "peft"), with its settings in both vocabularies."""

    fmt: str
    weights_file: Path
    config: dict
    metadata: dict
    fine_tune_type: str  # "lora" | "dora"
    rank: int
    scale: float
    alpha: float
    use_rslora: bool
    dropout: float
    base: str | None
    modules: dict[str, dict[str, tuple[str, Stored]]] = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted({int(BLOCK_PATH.match(p)["layer"]) for p in self.modules})

    @property
    def block_keys(self) -> list[str]:
        return sorted({BLOCK_PATH.match(p)["key"] for p in self.modules})

    def oriented(self, path: str, name: str, fmt: str) -> Stored:
        """The tensor ``name`` of module ``path`` in ``fmt``'s layout (bytes moved, not changed)."""
        leaf = next(leaf for leaf in LEAVES if leaf.name == name)
        _, stored = self.modules[path][name]
        if fmt != self.fmt and leaf.transpose:
            return Stored(stored.dtype, np.ascontiguousarray(stored.array.T))
        return stored


def _load_config(directory: Path) -> dict:
    path = directory / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (an adapter dir holds {CONFIG} and its weights)")
    return read_json_object(path)


def _weights(directory: Path, name: str) -> Path:
    path = directory / name
    if not path.is_file():
        other = " (adapter_model.bin: re-save with safe_serialization=True)" if (
            directory / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"{path}: missing{other}")
    return path


def read_mlx_adapter(directory: str | Path) -> Adapter:
    """An mlx-lm adapter dir (``adapters.safetensors`` + ``adapter_config.json``)."""
    directory = Path(directory)
    config = _load_config(directory)
    where = directory / CONFIG
    kind = config.get("fine_tune_type", "lora")
    if kind == "full":
        raise ValueError(f"{where}: fine_tune_type 'full' is a whole model, not an adapter; "
                         "convert it as model weights instead")
    if kind not in ("lora", "dora"):
        raise ValueError(f"{where}: unknown fine_tune_type {kind!r}; expected 'lora' or 'dora'")
    params = config.get("lora_parameters")
    if not isinstance(params, dict) or "rank" not in params or "scale" not in params:
        raise ValueError(f"{where}: lora_parameters must hold rank and scale; got {params!r}")
    rank, scale = int(params["rank"]), float(params["scale"])
    alpha, rslora = config.get("lora_alpha"), bool(config.get("use_rslora", False))
    if alpha is None or scale != alpha / (math.sqrt(rank) if rslora else rank):
        alpha, rslora = scale * rank, False  # our own trainer and peft-to-mlx record lora_alpha
    adapter = Adapter("mlx", _weights(directory, MLX_WEIGHTS), config, {}, kind, rank, scale,
                      alpha, rslora, float(params.get("dropout", 0.0)),
                      config.get("model") or config.get("base_model"))
    _collect(adapter)
    keys = params.get("keys")
    if keys is not None and set(keys) != set(adapter.block_keys):
        odd = sorted(set(keys) ^ set(adapter.block_keys))
        raise ValueError(f"{where}: lora_parameters.keys {sorted(keys)} differ from the modules "
                         f"with tensors in {MLX_WEIGHTS} {adapter.block_keys} (at {odd[0]})")
    return adapter


_PEFT_REFUSED = {  # field: (value that is fine, why anything else is refused)
    "fan_in_fan_out": (False, "weights stored transposed (GPT-2 Conv1D)"),
    "bias": ("none", "trained biases have no mlx-lm counterpart"),
    "lora_bias": (False, "lora_B with a bias has no mlx-lm counterpart"),
    "modules_to_save": (None, "fully trained extra modules are not an adapter mlx-lm loads"),
    "layer_replication": (None, "replicated layers have no mlx-lm counterpart"),
    "target_parameters": (None, "adapters on raw parameters have no mlx-lm counterpart"),
    "trainable_token_indices": (None, "trained token rows have no mlx-lm counterpart"),
    "use_qalora": (False, "QA-LoRA pools inputs; mlx-lm does not"),
}


def read_peft_adapter(directory: str | Path) -> Adapter:
    """A PEFT LoRA/DoRA dir (``adapter_model.safetensors`` + ``adapter_config.json``)."""
    directory = Path(directory)
    config = _load_config(directory)
    where = directory / CONFIG
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{where}: peft_type {config.get('peft_type')!r}: only LORA converts")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise ValueError(f"{where}: task_type {config['task_type']!r}: only CAUSAL_LM converts")
    for name, (fine, why) in _PEFT_REFUSED.items():
        value = config.get(name, fine)
        if value != fine and not (fine in (None, False) and not value):
            raise ValueError(f"{where}: {name}={config[name]!r} is not supported ({why})")
    if "r" not in config or "lora_alpha" not in config:
        raise ValueError(f"{where}: needs r and lora_alpha")
    rank, alpha = int(config["r"]), config["lora_alpha"]
    for name, value in (("rank_pattern", rank), ("alpha_pattern", alpha)):
        if any(v != value for v in (config.get(name) or {}).values()):
            raise ValueError(f"{where}: {name}={config[name]!r}: mlx-lm has one rank and one "
                             "scale for every module")
    rslora = bool(config.get("use_rslora", False))
    scale = alpha / (math.sqrt(rank) if rslora else rank)
    adapter = Adapter("peft", _weights(directory, PEFT_WEIGHTS), config, {},
                      "dora" if config.get("use_dora") else "lora", rank, scale, alpha, rslora,
                      float(config.get("lora_dropout", 0.0)), config.get("base_model_name_or_path"))
    _collect(adapter)
    return adapter


def _collect(adapter: Adapter) -> None:
    """Fill ``adapter.modules`` from its weights file; check names, ranks and shapes."""
    tensors, adapter.metadata = read_tensors(adapter.weights_file)
    where = adapter.weights_file
    for key, stored in tensors.items():
        split = split_key(key, adapter.fmt)
        if split is None:
            like = join_key("model.layers.0.self_attn.q_proj", LEAVES[0], adapter.fmt)
            raise ValueError(f"{where}: {key}: not a LoRA/DoRA tensor of a linear layer "
                             f"(expected names like {like})")
        path, leaf = split
        if not BLOCK_PATH.match(path):
            raise ValueError(f"{where}: {key}: only adapters inside the decoder blocks "
                             "(model.layers.N.*) convert; this model family or module is not "
                             "supported")
        if leaf.name == "m" and adapter.fine_tune_type != "dora":
            raise ValueError(f"{where}: {key}: a DoRA magnitude, but the config says LoRA")
        adapter.modules.setdefault(path, {})[leaf.name] = (key, stored)
    if not adapter.modules:
        raise ValueError(f"{where}: holds no adapter tensors")
    needed = ("A", "B", "m") if adapter.fine_tune_type == "dora" else ("A", "B")
    r = adapter.rank
    for path, parts in adapter.modules.items():
        for name in needed:
            if name not in parts:
                leaf = next(leaf for leaf in LEAVES if leaf.name == name)
                raise ValueError(f"{where}: {join_key(path, leaf, adapter.fmt)} is missing")
        a, b = (adapter.oriented(path, n, "peft").array for n in ("A", "B"))
        out = b.shape[0] if b.ndim == 2 else -1
        ok = a.ndim == 2 and b.ndim == 2 and a.shape[0] == r and b.shape[1] == r
        if "m" in parts:
            ok = ok and parts["m"][1].array.shape == (out,)
        if not ok:
            shapes = {parts[n][0]: tuple(parts[n][1].array.shape) for n in parts}
            moe = "3-D: mixture-of-experts layers are not supported; " if a.ndim == 3 else ""
            raise ValueError(f"{where}: {path}: shapes {shapes} do not fit rank {r} "
                             f"({moe}{adapter.fmt} layout expected)")
    expected = {(layer, key) for layer in adapter.layers for key in adapter.block_keys}
    present = {(int(m["layer"]), m["key"]) for m in map(BLOCK_PATH.match, adapter.modules)}
    if present != expected:
        layer, key = min(expected - present)
        raise ValueError(f"{where}: model.layers.{layer}.{key} has no adapter while other blocks "
                         "do: mlx-lm adapts the same modules in every adapted block")


# --- layer ranges: mlx-lm num_layers <-> PEFT layers_to_transform -------------------------------
def _contiguous(layers: list[int], where: Path) -> None:
    if layers != list(range(layers[0], layers[-1] + 1)):
        raise ValueError(f"{where}: adapted blocks {layers} are not one run: mlx-lm adapts the "
                         "last num_layers blocks")


def layers_to_transform(adapter: Adapter, base_layers: int | None) -> list[int] | None:
    """PEFT ``layers_to_transform`` for an mlx-lm adapter (None: every block)."""
    layers, n = adapter.layers, int(adapter.config.get("num_layers", -1))
    where = adapter.weights_file.parent / CONFIG
    _contiguous(layers, where)
    if base_layers is not None:
        want = list(range(max(base_layers - n, 0) if n > 0 else 0, base_layers))
        if layers != want:
            raise ValueError(f"{where}: num_layers={n} of a {base_layers}-block base adapts "
                             f"blocks {want[0]}..{want[-1]}, but {MLX_WEIGHTS} has blocks {layers}")
        return None if layers[0] == 0 else layers
    if layers[0] > 0 and n != len(layers):
        raise ValueError(f"{where}: num_layers={n} but {MLX_WEIGHTS} adapts blocks {layers}")
    return None if layers[0] == 0 else layers


def mlx_num_layers(adapter: Adapter, base_layers: int | None) -> int:
    """mlx-lm ``num_layers`` for a PEFT adapter (-1: every block, mlx-lm's own convention)."""
    layers, where = adapter.layers, adapter.weights_file.parent / CONFIG
    _contiguous(layers, where)
    chosen = adapter.config.get("layers_to_transform")
    if chosen is None or chosen == []:
        if base_layers is not None and layers != list(range(base_layers)):
            raise ValueError(f"{where}: no layers_to_transform, yet only blocks {layers} of "
                             f"{base_layers} have adapters")
        if layers[0] != 0:
            raise ValueError(f"{where}: no layers_to_transform, yet blocks 0..{layers[0] - 1} "
                             "have no adapters")
        return base_layers if base_layers is not None else -1
    chosen = sorted([chosen] if isinstance(chosen, int) else chosen)
    if chosen != layers:
        raise ValueError(f"{where}: layers_to_transform={chosen} but {PEFT_WEIGHTS} has "
                         f"blocks {layers}")
    if base_layers is None:
        raise ValueError(f"{where}: layers_to_transform={chosen}: mlx-lm counts adapted blocks "
                         "from the end; pass --base MODEL_DIR so the block count is known")
    if layers[-1] != base_layers - 1:
        raise ValueError(f"{where}: layers_to_transform={chosen} does not end at the last of "
                         f"{base_layers} blocks: mlx-lm adapts only the last num_layers blocks")
    return len(layers)


# --- configs --------------------------------------------------------------------------------
def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def peft_config(adapter: Adapter, base_layers: int | None, base: str | None) -> dict:
    """PEFT ``adapter_config.json`` for an mlx-lm adapter: r, lora_alpha = scale * r, ..."""
    chosen = layers_to_transform(adapter, base_layers)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base or adapter.base, "revision": None,
        "r": adapter.rank, "lora_alpha": _number(adapter.alpha), "use_rslora": adapter.use_rslora,
        "lora_dropout": adapter.dropout, "use_dora": adapter.fine_tune_type == "dora",
        "target_modules": adapter.block_keys, "layers_to_transform": chosen,
        "layers_pattern": "layers" if chosen else None, "bias": "none", "fan_in_fan_out": False,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
        "init_lora_weights": True, "inference_mode": True,
    }


def mlx_config(adapter: Adapter, base_layers: int | None, base: str | None) -> dict:
    """mlx-lm ``adapter_config.json`` for a PEFT adapter: rank, scale = lora_alpha / r, ...

    ``lora_alpha`` (and ``use_rslora``) are kept beside, for the way back; mlx-lm ignores them.
    """
    config = {
        "fine_tune_type": adapter.fine_tune_type,
        "num_layers": mlx_num_layers(adapter, base_layers),
        "lora_parameters": {"rank": adapter.rank, "scale": adapter.scale,
                            "dropout": adapter.dropout, "keys": adapter.block_keys},
        "model": base or adapter.base, "lora_alpha": _number(adapter.alpha),
    }
    if adapter.use_rslora:
        config["use_rslora"] = True
    return config


# --- the two verbs --------------------------------------------------------------------------
def _convert(src, out, base, force, reader, fmt, weights_name, make_config) -> Path:
    verb = "mlx-adapter-to-peft" if fmt == "peft" else "peft-to-mlx-adapter"
    check_output_dir(Path(out), force, verb)
    adapter = reader(src)
    base_layers = hidden = None
    if base is not None:
        from .fuse import read_base_model

        model = read_base_model(base)
        model.check_adapter(adapter)
        base_layers, hidden = model.num_layers, model.config.get("hidden_size")
    head = read_value_head(src, hidden)
    config = make_config(adapter, base_layers, str(base) if base is not None else None)
    tensors = {join_key(path, leaf, fmt): adapter.oriented(path, leaf.name, fmt)
               for path, parts in adapter.modules.items() for leaf in LEAVES if leaf.name in parts}
    metadata = {**adapter.metadata, "format": "pt" if fmt == "peft" else "mlx"}
    with atomic_output_dir(out, force, verb) as tmp:
        write_tensors(tmp / weights_name, tensors, metadata)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        write_value_head(tmp, head)
        if (Path(src) / CHAT_TEMPLATE).is_file():  # the template the adapter was trained with
            shutil.copy2(Path(src) / CHAT_TEMPLATE, tmp / CHAT_TEMPLATE)
    return Path(out)


def mlx_adapter_to_peft(src: str | Path, out: str | Path, base: str | Path | None = None,
                        force: bool = False) -> Path:
    """mlx-lm adapter dir -> PEFT adapter dir (lora_A = lora_a^T, lora_B = lora_b^T, same m).

    With ``base`` (an HF or MLX model dir) every shape is checked against it first.
    """
    return _convert(src, out, base, force, read_mlx_adapter, "peft", PEFT_WEIGHTS, peft_config)


def peft_to_mlx_adapter(src: str | Path, out: str | Path, base: str | Path | None = None,
                        force: bool = False) -> Path:
    """PEFT adapter dir -> mlx-lm adapter dir (lora_a = lora_A^T, lora_b = lora_B^T, same m).

    ``base`` is needed when layers_to_transform names a final run of blocks (mlx-lm counts from
    the end); given, it also checks every shape.
    """
    return _convert(src, out, base, force, read_peft_adapter, "mlx", MLX_WEIGHTS, mlx_config)


def read_adapter(directory: str | Path) -> Adapter:
    """Either kind of adapter dir, told apart by its weights file's name."""
    directory = Path(directory)
    kinds = [name for name in (MLX_WEIGHTS, PEFT_WEIGHTS) if (directory / name).is_file()]
    if len(kinds) != 1:
        raise FileNotFoundError(f"{directory}: expected exactly one of {MLX_WEIGHTS} (mlx-lm) "
                                f"or {PEFT_WEIGHTS} (PEFT); found {kinds or 'neither'}")
    return read_mlx_adapter(directory) if kinds[0] == MLX_WEIGHTS else read_peft_adapter(directory)
