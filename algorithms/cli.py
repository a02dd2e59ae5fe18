"""The command line both backends share: ``python -m mlx_ft <algorithm> [flags]``.

``mlx_ft/__main__.py`` and ``cuda_ft/__main__.py`` call :func:`run_cli` with their backend class,
so the flags are identical by construction. Everything that can be checked without a model is
checked first (flags, YAML, model path, every data example), then the backend is imported and the
model loaded. ``--help`` imports neither mlx nor torch.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .config import ConfigError, build_config, save_config
from .registry import algorithms


class UserError(Exception):
    """An error the user can fix; printed without a traceback."""


def usage(prog: str) -> str:
    lines = [f"usage: python -m {prog} <algorithm> [flags]   (python -m {prog} <algorithm> --help)",
             f"       python -m {prog} --list-rewards", "", "algorithms:"]
    for algo in algorithms().values():
        lines.append(f"  {algo.name:<10} {algo.summary}")
    return "\n".join(lines)


def run_cli(prog: str, backend_spec: str, argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help", "list"):
        print(usage(prog))
        return 0
    if argv[0] == "--list-rewards":
        from rewards import format_reward_list

        print(format_reward_list())
        return 0
    registry = algorithms()
    name = argv[0]
    if name not in registry:
        import difflib

        close = difflib.get_close_matches(name, list(registry), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"error: unknown algorithm {name!r}{hint}\n\n{usage(prog)}", file=sys.stderr)
        return 2
    algo = registry[name]
    try:
        cfg = build_config(algo.config_cls, argv[1:], prog=f"python -m {prog} {name}")
        result = run_training(prog, backend_spec, algo, cfg)
    except (ConfigError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"steps": result.steps, "train_loss": result.final_train_loss,
                      "valid_loss": result.final_valid_loss, "run_dir": str(result.run_dir)}))
    if result.sample is not None:
        print(f"\n>>> {cfg.sample_prompt}\n{result.sample}")
    return 0


def load_backend_class(spec: str) -> type:
    module, _, cls = spec.partition(":")
    return getattr(importlib.import_module(module), cls)


def run_training(prog: str, backend_spec: str, algo, cfg):
    from converters.models import resolve_model

    from .data import DataError

    try:
        model_path = resolve_model(cfg.model)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"--model {cfg.model}: {e}") from None
    tokenizer = load_tokenizer(model_path)
    try:
        data = algo.prepare_data(cfg, tokenizer)
    except (DataError, FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    for split, report in data.reports.items():
        print(f"{prog}: {split}: {report}", file=sys.stderr)

    run_dir = Path(cfg.run_dir)
    if not cfg.resume and (run_dir / "checkpoints").exists():
        raise UserError(f"--run-dir {run_dir} already holds checkpoints; pass --resume to "
                        "continue that run or choose another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.json", {"backend": prog, "model_path": str(model_path)})

    started = time.perf_counter()
    backend = load_backend_class(backend_spec)(cfg, model_path, tokenizer)
    try:
        result = algo.train(cfg, backend, data, run_dir, model_path)
    except (FileNotFoundError, ValueError) as e:
        if "--resume" in str(e):
            raise UserError(str(e)) from None
        raise
    print(f"{prog}: {result.steps} steps in {time.perf_counter() - started:.1f}s; "
          f"adapters in {run_dir / 'adapters'}", file=sys.stderr)
    return result


def load_tokenizer(model_path: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
