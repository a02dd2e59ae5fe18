"""A benchmark recipe: what is trained, on what data, with which settings, for how long.

The same recipe is run by every runner (our backends, mlx-lm, TRL). ``model`` is a model dir,
a known short name (``smollm2-135m``) or ``random:SIZE`` (``random:1b``: a random-init Llama of
that size class built in code by :mod:`converters.random_init`, so a 1B-class model can be
measured with no download). ``data`` is a path or ``synthetic:chat`` / ``synthetic:preference``
(see :mod:`scripts.benchkit.synthetic`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

# Settings every compared run must share (the matched-settings check compares exactly these).
MATCHED = ("model", "data", "fine_tune_type", "lora_rank", "lora_alpha", "target_modules",
           "batch_size", "max_length", "steps", "learning_rate", "dtype")


@dataclasses.dataclass
class Recipe:
    model: str = "smollm2-135m"
    algorithm: str = "sft"
    data: str = "synthetic:chat"
    fine_tune_type: str = "lora"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    target_modules: list = dataclasses.field(default_factory=list)  # [] = every block linear
    batch_size: int = 4
    max_length: int = 512
    steps: int = 30
    warmup: int = 3  # leading steps left out of every timing statistic (compilation, caches)
    learning_rate: float = 1e-4
    dtype: str = "auto"  # auto = float32 on CPU, bfloat16 on a GPU (per run)
    seed: int = 0
    train_on: str = "all"  # mlx-lm's mask_prompt=false counts and trains on every real token
    model_dtype: str = "float32"  # dtype random:SIZE weights are written in
    extra: list = dataclasses.field(default_factory=list)  # more flags for our CLIs only

    def validate(self) -> None:
        for name in ("lora_rank", "batch_size", "max_length", "steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)}: must be > 0")
        if not 0 <= self.warmup < self.steps:
            raise ValueError(f"--warmup={self.warmup}: must be in [0, --steps) so that at least "
                             "one step is measured")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolved_dtype(recipe: Recipe, device: str) -> str:
    if recipe.dtype != "auto":
        return recipe.dtype
    return "float32" if device == "cpu" else "bfloat16"


def resolve_model(recipe: Recipe, cache: Path) -> Path:
    """A local HF model dir for ``recipe.model`` (building ``random:SIZE`` once into ``cache``)."""
    if recipe.model.startswith("random:"):
        from converters.random_init import make_random_model

        size = recipe.model.split(":", 1)[1]
        out = cache / f"random-{size}-{recipe.model_dtype}-seed{recipe.seed}"
        if not (out / "config.json").is_file():
            print(f"bench: building random-init model {size} ({recipe.model_dtype}) -> {out}",
                  flush=True)
            make_random_model(out, size, dtype=recipe.model_dtype, seed=recipe.seed)
        return out
    from converters.models import resolve_model as resolve

    return Path(resolve(recipe.model)).resolve()


def resolve_data(recipe: Recipe, out_dir: Path) -> Path:
    """A data dir with ``train.jsonl`` and ``valid.jsonl`` (mlx-lm needs a validation split)."""
    if recipe.data.startswith("synthetic:"):
        from .synthetic import write_synthetic

        kind = recipe.data.split(":", 1)[1]
        return write_synthetic(out_dir / f"data-{kind}", kind, seed=recipe.seed).resolve()
    path = Path(recipe.data).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(f"--data {recipe.data}: no such file or directory")
    if path.is_dir() and (path / "valid.jsonl").is_file():
        return path
    # One file (or a dir without a validation split): every runner gets the same dir holding
    # it as train.jsonl and its first lines as valid.jsonl.
    lines = (path / "train.jsonl" if path.is_dir() else path).read_text().splitlines(True)
    out = out_dir / "data"
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.jsonl").write_text("".join(lines))
    (out / "valid.jsonl").write_text("".join(lines[:max(1, min(16, len(lines) // 10))]))
    return out.resolve()


def data_fingerprint(path: Path) -> str:
    """sha256 of the training split, so 'same data' means the same bytes."""
    file = path / "train.jsonl" if path.is_dir() else path
    return hashlib.sha256(file.read_bytes()).hexdigest()[:16]


def block_linear_names(model_dir: Path) -> list[str]:
    """Block-relative names of the linear layers in block 0 (``self_attn.q_proj``, ...), read
    from the safetensors headers (no weights loaded): what "every block linear" means."""
    names = set()
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with file.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for key, meta in header.items():
            prefix = "model.layers.0."
            if key.startswith(prefix) and key.endswith(".weight") and len(meta["shape"]) == 2:
                names.add(key[len(prefix):-len(".weight")])
    return sorted(names)


def stored_dtype(model_dir: Path) -> str:
    """The floating dtype the weights are stored in (what mlx-lm trains in)."""
    codes = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with file.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for key, meta in header.items():
            if key != "__metadata__" and meta["dtype"] in codes:
                return codes[meta["dtype"]]
    return "float32"


def our_flags(recipe: Recipe, model: Path, data: Path, run_dir: Path, dtype: str) -> list[str]:
    """Flags of ``python -m mlx_ft|cuda_ft <algorithm>`` for this recipe (same on both)."""
    flags = ["--model", str(model), "--data", str(data), "--run-dir", str(run_dir),
             "--fine-tune-type", recipe.fine_tune_type, "--lora-rank", str(recipe.lora_rank),
             "--lora-alpha", str(recipe.lora_alpha), "--batch-size", str(recipe.batch_size),
             "--max-length", str(recipe.max_length), "--steps", str(recipe.steps),
             "--learning-rate", str(recipe.learning_rate), "--dtype", dtype,
             "--seed", str(recipe.seed), "--log-every", "1", "--eval-batches", "1",
             "--max-grad-norm", "0", "--no-progress"]
    if recipe.algorithm == "sft":
        flags += ["--train-on", recipe.train_on]
    if recipe.target_modules:
        flags += ["--target-modules", *recipe.target_modules]
    return flags + list(recipe.extra)
