"""Converters: move weights, tokenizers and adapters between formats, each named by direction.

- `hf_to_mlx` / `mlx_to_hf`: Hugging Face model dir <-> MLX model dir (dtype cast, affine 2-8
  bit quantisation with an optional mixed recipe; dequantise on the way back), shard by shard.
- `mlx_adapter_to_peft` / `peft_to_mlx_adapter`: LoRA / DoRA adapters, mlx-lm <-> PEFT.
- `fuse`: merge an adapter (either format) into an HF or MLX (possibly quantised) base.
- `gguf_to_hf` / `gguf_to_mlx` / `hf_to_gguf`: llama.cpp GGUF files (F32/F16/BF16, Q8_0, Q4_0,
  Q4_1, K-quants) in and out; Q4_0/Q4_1/Q8_0 stay quantised, exactly, on the way to MLX.
- `describe(path)`: what a file or directory is (format, architecture, dtype, quantisation,
  parameters, adapter rank and targets); `python -m converters info PATH`.
- `resolve_model(name_or_path)`: a model directory, or a known short name such as
  "smollm2-135m" that is imported once from a GGUF shipped on PyPI into the local cache.

Every converter writes into a temporary sibling and renames it at the end (`atomic`), refuses to
overwrite without `force`, and checks its input before writing anything. Command line:
`python -m converters --help`. Importing this package never imports torch or mlx; a converter
that needs one imports it when it runs.
"""

from .adapters import mlx_adapter_to_peft, peft_to_mlx_adapter
from .gguf_to_hf import gguf_to_hf
from .hf_mlx import hf_to_mlx, mlx_to_hf
from .inspect import describe
from .models import KNOWN_MODELS, resolve_model

# `fuse`, `gguf_to_mlx` and `hf_to_gguf` share their module's name; import them from it
# (`from converters.fuse import fuse`) so `converters.fuse` stays the module.
__all__ = ["KNOWN_MODELS", "describe", "gguf_to_hf", "hf_to_mlx", "mlx_adapter_to_peft",
           "mlx_to_hf", "peft_to_mlx_adapter", "resolve_model"]
