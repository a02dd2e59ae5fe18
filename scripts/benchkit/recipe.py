"""A benchmark recipe: what is trained, on what data, with which settings, for how long.

The same recipe is run by every runner (our backends, mlx-lm, TRL). ``model`` is a model dir,
a known short name (``smollm2-135m``) or ``random:SIZE`` (``random:1b``: a random-init Llama of
that size class built in code by :mod:`converters.random_init`, so a 1B-class model can be
measured with no download). ``data`` is a path or ``synthetic:chat`` / ``synthetic:preference``
(see :mod:`scripts.benchkit.synthetic`); empty = the algorithm's own synthetic set (chat for SFT,
preference pairs for the offline preference methods, arithmetic prompts for the online ones).

Online recipes (grpo and the other presets of ``python -m mlx_ft <online>``) add the generation
batch (``prompts_per_step`` x ``num_generations`` completions per step, ``batch_size`` of them per
forward), the sampling settings and the reward; ``beta`` is the KL (online) or DPO temperature.
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
# ... and per algorithm, the settings of its loss and (online) of its generation batch
OFFLINE_PREFERENCE = ("dpo", "ipo")
ONLINE = ("grpo",)  # online recipes the TRL comparison covers (GRPOTrainer)
PREFERENCE_MATCHED = ("beta", "loss_type")
ONLINE_MATCHED = ("prompts_per_step", "num_generations", "max_completion_length", "temperature",
                  "top_p", "top_k", "beta", "loss_type", "epsilon", "scale_rewards",
                  "use_bias_correction_kl", "num_iterations", "reward")
DEFAULT_DATA = {"sft": "synthetic:chat", "online": "synthetic:arith",
                "preference": "synthetic:preference", "other": "synthetic:chat"}
DEFAULT_BETA = {"online": 0.04, "preference": 0.1}


def family(algorithm: str) -> str:
    """sft | preference | online | other (what data, flags and matched settings the recipe
    needs; other algorithms get the common flags only, as before this distinction)."""
    if algorithm == "sft":
        return "sft"
    if algorithm in ONLINE:
        return "online"
    return "preference" if algorithm in OFFLINE_PREFERENCE else "other"


def matched_keys(algorithm: str) -> tuple[str, ...]:
    """The settings two runs of ``algorithm`` must share to be compared. Online runs have no
    training length (prompts are never truncated here), so ``max_length`` is not among them."""
    kind = family(algorithm)
    if kind == "online":
        return tuple(k for k in MATCHED if k != "max_length") + ONLINE_MATCHED
    return MATCHED + (PREFERENCE_MATCHED if kind == "preference" else ())


@dataclasses.dataclass
class Recipe:
    model: str = "smollm2-135m"
    algorithm: str = "sft"
    data: str = ""  # "" = DEFAULT_DATA of the algorithm's family
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
    # preference and online
    beta: float | None = None  # None = DEFAULT_BETA of the family (DPO 0.1, GRPO's KL 0.04)
    # online: one step = prompts_per_step x num_generations completions, batch_size per forward
    prompts_per_step: int = 8
    num_generations: int = 4
    max_completion_length: int = 64
    temperature: float = 1.0
    reward: str = "math_answer"

    def __post_init__(self) -> None:
        if not self.data:
            self.data = DEFAULT_DATA[family(self.algorithm)]
        if self.beta is None and family(self.algorithm) in DEFAULT_BETA:
            self.beta = DEFAULT_BETA[family(self.algorithm)]

    def validate(self) -> None:
        names = ["lora_rank", "batch_size", "max_length", "steps"]
        if family(self.algorithm) == "online":
            names += ["prompts_per_step", "num_generations", "max_completion_length"]
        for name in names:
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)}: must be > 0")
        if family(self.algorithm) == "online":
            completions = self.prompts_per_step * self.num_generations
            if completions % self.batch_size:
                raise ValueError(f"--batch-size={self.batch_size}: must divide --prompts-per-step "
                                 f"x --num-generations = {completions} (TRL accumulates whole "
                                 "micro-batches of one generation batch)")
            if self.num_generations < 2:
                raise ValueError(f"--num-generations={self.num_generations}: must be >= 2 "
                                 "(group advantages)")
            if self.temperature <= 0:
                raise ValueError(f"--temperature={self.temperature}: must be > 0")
        if self.beta is not None and self.beta < 0:
            raise ValueError(f"--beta={self.beta}: must be >= 0")
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
    kind = family(recipe.algorithm)
    if kind == "sft":
        flags += ["--train-on", recipe.train_on]
    if kind in ("preference", "online"):
        flags += ["--beta", str(recipe.beta)]
    if kind == "online":
        flags += ["--prompts-per-step", str(recipe.prompts_per_step),
                  "--num-generations", str(recipe.num_generations),
                  "--max-completion-length", str(recipe.max_completion_length),
                  "--temperature", str(recipe.temperature), "--reward", recipe.reward]
    if recipe.target_modules:
        flags += ["--target-modules", *recipe.target_modules]
    return flags + list(recipe.extra)
