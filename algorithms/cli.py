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
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise UserError(f"--model {cfg.model}: {e}") from None
    try:
        tokenizer = load_tokenizer(model_path, cfg.chat_template, prog)
        data = algo.prepare_data(cfg, tokenizer)
    except (DataError, FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    for split, report in data.reports.items():
        print(f"{prog}: {split}: {report}", file=sys.stderr)

    run_dir = Path(cfg.run_dir)
    if not cfg.resume and (run_dir / "checkpoints").exists():
        raise UserError(f"--run-dir {run_dir} already holds checkpoints; pass --resume to "
                        "continue that run or choose another --run-dir")
    fingerprint = data_fingerprint(data)
    if cfg.resume:
        check_resume_data(run_dir, fingerprint)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.json", {"backend": prog, "model_path": str(model_path),
                                               "data_fingerprint": fingerprint})

    started = time.perf_counter()
    backend = load_backend_class(backend_spec)(cfg, model_path, tokenizer)
    prepare = algo.make_prepare(cfg, backend, data, model_path) if algo.make_prepare else None
    loop = algo.train or offline_train
    try:
        result = loop(cfg, backend, algo.make_loss(cfg), data, run_dir, prepare, algo.normaliser)
    except (FileNotFoundError, ValueError) as e:
        if "--resume" in str(e):
            raise UserError(str(e)) from None
        raise
    print(f"{prog}: {result.steps} steps in {time.perf_counter() - started:.1f}s; "
          f"adapters in {run_dir / 'adapters'}", file=sys.stderr)
    return result


def offline_train(cfg, backend, loss_fn, data, run_dir, prepare, normaliser):
    """The shared loop of :mod:`algorithms.loop` over prepared batch plans."""
    from .loop import train

    return train(cfg, backend, loss_fn, data.train, data.valid, run_dir, prepare=prepare,
                 normaliser=normaliser)


def load_tokenizer(model_path: Path, chat_template: str = "", prog: str = ""):
    """The model's tokenizer (pad = eos when it has no pad), with ``--chat-template`` applied."""
    from transformers import AutoTokenizer

    from .data.templates import apply_chat_template

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template:
        for warning in apply_chat_template(tokenizer, chat_template):
            print(f"{prog or 'posttrain'}: warning: {warning}", file=sys.stderr)
    return tokenizer


def data_fingerprint(data) -> str:
    """sha256 over every training and validation example's tokens, masks and labels: what the
    run's data cursor indexes into (saved in config.json; --resume refuses another)."""
    import hashlib

    h = hashlib.sha256()
    for plan in (data.train, data.valid):
        dataset = getattr(plan, "dataset", plan)  # batch plans, or RL prompt sets
        for example in getattr(dataset, "examples", []) if dataset is not None else []:
            _hash_example(h, example)
        h.update(b"|")
    return h.hexdigest()


def _hash_example(h, example) -> None:
    import numpy as np

    if hasattr(example, "input_ids"):  # SFT examples and preference sides
        h.update(np.asarray(example.input_ids, dtype="<i8").tobytes() + b"m")
        h.update(np.asarray(example.loss_mask, dtype="<u1").tobytes() + b";")
    elif hasattr(example, "chosen"):
        _hash_example(h, example.chosen)
        _hash_example(h, example.rejected)
    elif hasattr(example, "sequence"):
        _hash_example(h, example.sequence)
        h.update(b"L1" if example.label else b"L0")
    else:  # an RL prompt: its tokens and the columns the rewards read
        h.update(np.asarray(example.prompt_ids, dtype="<i8").tobytes())
        h.update(json.dumps(example.columns, sort_keys=True, default=str).encode())


def check_resume_data(run_dir: Path, fingerprint: str) -> None:
    """Refuse to resume a run whose data (after mixing and hold-out) changed."""
    saved = run_dir / "config.json"
    try:
        previous = json.loads(saved.read_text()).get("data_fingerprint")
    except (OSError, ValueError):
        return
    if previous and previous != fingerprint:
        raise UserError(f"--resume: the data differs from the data {run_dir} was trained on "
                        "(a source, its content, the mix, the hold-out or the tokenisation "
                        "changed); resuming would continue from a cursor into other examples. "
                        "Use the same data or a new --run-dir")
