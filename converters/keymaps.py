"""Per-family key maps between Hugging Face checkpoints and mlx-lm models, in both directions.

mlx-lm names its parameters after the HF checkpoint keys, and its `Model.sanitize(weights)`
adapts a checkpoint at load time. For each supported family this module states what that
adaptation is, as data, and applies it (or its inverse) one tensor at a time:

| family  | mlx-lm module | its sanitize drops               | HF -> MLX here | MLX -> HF here |
|---------|---------------|----------------------------------|----------------|----------------|
| llama   | llama         | `*rotary_emb.inv_freq`; tied     | D              | identity       |
|         |               | `lm_head.weight`                 |                |                |
| mistral | llama (remap) | as llama                         | D              | identity       |
| qwen2   | qwen2         | as llama                         | D              | identity       |
| qwen3   | qwen3         | tied `lm_head.weight`            | D              | identity       |
| gemma   | gemma         | nothing (always tied: no lm_head) | D             | identity       |
| gemma2  | gemma2        | nothing (as gemma)               | D              | identity       |
| phi3    | phi3          | nothing (HF and mlx-lm both keep | D              | identity       |
|         |               | fused `qkv_proj`, `gate_up_proj`) |               |                |

D = drop `*rotary_emb.inv_freq`, and drop `lm_head.weight` when the embeddings are tied.

No family renames a key or changes a value. In particular gemma / gemma2 store RMSNorm weights
as offsets w and BOTH libraries compute `x * (1 + w)`, so the stored values pass through
unchanged (adding 1 on conversion would shift the norms twice). The only HF -> MLX change is
dropping tensors the target recomputes: rotary `inv_freq` buffers (derived from rope_theta) and
`lm_head.weight` when the embeddings are tied (the target uses `embed_tokens`). MLX -> HF restores
nothing, because transformers recomputes both. So hf -> mlx -> hf is bit-identical for
checkpoints without those derived tensors (what `save_pretrained` writes).

Config: transformers defaults `tie_word_embeddings` per family (gemma: true, others: false) while
mlx-lm's llama defaults it to true and qwen3 requires it, so `hf_to_mlx_config` always writes it
explicitly. Gemma / gemma2 with untied embeddings cannot load in mlx-lm and are refused.
transformers >= 5 saves rope settings only nested, as `rope_parameters` {rope_theta, rope_type,
...}; mlx-lm's llama / qwen2 / gemma / gemma2 / phi3 read only the flat `rope_theta`,
`rope_scaling`, `partial_rotary_factor` and would silently fall back to theta 10000, so
`hf_to_mlx_config` adds the flat keys a config lacks (`rope_scaling` = the nested dict plus
"type" when rope_type is not "default") and `mlx_to_hf_config` removes them again when they
still equal what `rope_parameters` gives.

A family whose mlx-lm names differ lists `renames`: (HF fragment, MLX fragment) pairs of whole
dotted components, applied left to right in one direction and right to left in the other; they
are checked one-to-one when the table is built, so the map always inverts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

DERIVED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers both libraries recompute from the config
LM_HEAD = "lm_head.weight"
QUANT_CONFIG_KEYS = ("quantization", "quantization_config")


@dataclass(frozen=True)
class Family:
    """What converting one `model_type` between HF and mlx-lm takes."""

    model_type: str
    hf_architecture: str  # config "architectures" entry for transformers
    mlx_module: str  # mlx_lm.models.<mlx_module> holds Model and ModelArgs
    hf_tie_default: bool  # transformers' tie_word_embeddings when config.json omits it
    mlx_has_lm_head: bool = True  # False: the mlx-lm model always ties (no lm_head module)
    renames: tuple[tuple[str, str], ...] = ()  # (HF fragment, MLX fragment), dotted components

    def __post_init__(self) -> None:
        for side, fragments in (("HF", [h for h, _ in self.renames]),
                                ("MLX", [m for _, m in self.renames])):
            if len(set(fragments)) != len(fragments):
                raise ValueError(f"{self.model_type}: {side} rename fragments are not unique, so "
                                 "the key map would not invert")


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", "LlamaForCausalLM", "llama", hf_tie_default=False),
    Family("mistral", "MistralForCausalLM", "llama", hf_tie_default=False),
    Family("qwen2", "Qwen2ForCausalLM", "qwen2", hf_tie_default=False),
    Family("qwen3", "Qwen3ForCausalLM", "qwen3", hf_tie_default=False),
    Family("gemma", "GemmaForCausalLM", "gemma", hf_tie_default=True, mlx_has_lm_head=False),
    Family("gemma2", "Gemma2ForCausalLM", "gemma2", hf_tie_default=True, mlx_has_lm_head=False),
    Family("phi3", "Phi3ForCausalLM", "phi3", hf_tie_default=False),
)}


def supported() -> str:
    return ", ".join(sorted(FAMILIES))


def family_for(config: dict[str, Any], config_path: str | os.PathLike) -> Family:
    """The Family of a config.json, or an error naming the file, the key and the supported ones."""
    model_type = config.get("model_type")
    if model_type is None:
        raise ValueError(f"{config_path}: key model_type is missing (supported: {supported()})")
    if model_type not in FAMILIES:
        raise ValueError(f"{config_path}: model_type = {model_type!r} is not supported by the "
                         f"HF <-> MLX converters (supported: {supported()})")
    return FAMILIES[model_type]


def is_tied(family: Family, config: dict[str, Any], config_path: str | os.PathLike) -> bool:
    """Whether lm_head shares embed_tokens' weight, with transformers' per-family default."""
    tied = bool(config.get("tie_word_embeddings", family.hf_tie_default))
    if not tied and not family.mlx_has_lm_head:
        raise ValueError(f"{config_path}: tie_word_embeddings = false, but mlx-lm's "
                         f"{family.mlx_module} model always ties lm_head to embed_tokens")
    return tied


def _substitute(key: str, pairs: list[tuple[str, str]]) -> str:
    dotted = f".{key}."
    for old, new in pairs:
        if f".{old}." in dotted:
            return dotted.replace(f".{old}.", f".{new}.", 1)[1:-1]
    return key


def hf_to_mlx_key(family: Family, key: str, tied: bool) -> str | None:
    """The mlx-lm name of an HF tensor, or None when mlx-lm does not keep it (derived tensors)."""
    if key.endswith(DERIVED_SUFFIXES) or (key == LM_HEAD and tied):
        return None
    return _substitute(key, list(family.renames))


def mlx_to_hf_key(family: Family, key: str) -> str:
    """The HF name of an mlx-lm tensor (inverse of hf_to_mlx_key on the keys it keeps)."""
    return _substitute(key, [(m, h) for h, m in family.renames])


def flat_rope(config: dict[str, Any]) -> dict[str, Any]:
    """The flat rope keys mlx-lm reads, derived from transformers 5's nested `rope_parameters`."""
    nested = config.get("rope_parameters")
    if not isinstance(nested, dict):
        return {}
    flat = {k: nested[k] for k in ("rope_theta", "partial_rotary_factor") if k in nested}
    rope_type = nested.get("rope_type", nested.get("type", "default"))
    if rope_type != "default":
        flat["rope_scaling"] = {**nested, "type": rope_type}
    return flat


def hf_to_mlx_config(family: Family, config: dict[str, Any],
                     config_path: str | os.PathLike) -> dict[str, Any]:
    """config.json for mlx-lm: tie_word_embeddings written out, nested rope settings flattened."""
    out = dict(config)
    out["tie_word_embeddings"] = is_tied(family, config, config_path)
    for key, value in flat_rope(config).items():
        if out.get(key) is None:
            out[key] = value
    return out


def mlx_to_hf_config(family: Family, config: dict[str, Any]) -> dict[str, Any]:
    """config.json for transformers: mlx-lm's quantisation entries and flattened rope keys
    removed, architecture set."""
    out = {k: v for k, v in config.items() if k not in QUANT_CONFIG_KEYS}
    for key, value in flat_rope(config).items():
        if out.get(key) == value:
            del out[key]
    out.setdefault("architectures", [family.hf_architecture])
    return out


def mlx_model_skeleton(family: Family, config: dict[str, Any],
                       config_path: str | os.PathLike | None = None) -> Any:
    """The mlx-lm model for `config`, unevaluated: its parameters have shapes but no memory."""
    import importlib

    module = importlib.import_module(f"mlx_lm.models.{family.mlx_module}")
    try:
        return module.Model(module.ModelArgs.from_dict(config))
    except (TypeError, ValueError, KeyError, AssertionError) as error:
        raise ValueError(f"{config_path or 'config'}: mlx-lm cannot build a {family.model_type} "
                         f"model from it ({error})") from error


def expected_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    """{mlx-lm parameter name: shape} of an (unquantised) skeleton."""
    from mlx.utils import tree_flatten

    return {name: tuple(value.shape) for name, value in tree_flatten(model.parameters())}


def quantisable_modules(model: Any) -> dict[str, Any]:
    """{module path: module} for the layers mlx-lm can quantise (Linear, Embedding)."""
    return {path: module for path, module in model.named_modules()
            if path and hasattr(module, "to_quantized")}

