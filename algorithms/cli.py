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
from typing import Any

from .config import ConfigError, build_config, config_json
from .registry import algorithms


class UserError(Exception):
    """An error the user can fix; printed without a traceback (``quiet``: another rank of the
    job prints it)."""

    def __init__(self, message: str, quiet: bool = False) -> None:
        super().__init__(message)
        self.quiet = quiet


# Verbs beside the algorithms: module:function(prog, backend_spec, argv) -> exit code.
VERBS = {
    "evaluate": ("algorithms.evaluation:main",
                 ("an algorithm's own metrics on a data split (test by default), with or without "
                 "an adapter; JSON out")),
    "generate": ("algorithms.generation:generate_main",
                 "completions for one prompt or a JSONL of prompts -> JSONL"),
    "chat": ("algorithms.generation:chat_main", "an interactive chat in the terminal"),
}


def usage(prog: str) -> str:
    lines = [f"usage: python -m {prog} <algorithm> [flags]   (python -m {prog} <algorithm> --help)",
             f"       python -m {prog} evaluate|generate|chat [flags]",
             f"       python -m {prog} --list-rewards", "", "algorithms:"]
    registry = algorithms()
    width = max(len(name) for name in [*registry, *VERBS])
    lines += [f"  {algo.name:<{width}} {algo.summary}" for algo in registry.values()]
    lines += ["", "verbs:"]
    lines += [f"  {verb:<{width}} {summary}" for verb, (_, summary) in VERBS.items()]
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
    if name in VERBS:
        from .distributed import launcher

        if launcher():
            print(f"error: {name} runs in one process; start it without {launcher()} (only "
                  "training runs across processes)", file=sys.stderr)
            return 2
        module, _, function = VERBS[name][0].partition(":")
        return getattr(importlib.import_module(module), function)(prog, backend_spec, argv[1:])
    if name not in registry:
        import difflib

        close = difflib.get_close_matches(name, list(registry), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"error: unknown algorithm {name!r}{hint}\n\n{usage(prog)}", file=sys.stderr)
        return 2
    algo = registry[name]
    if "--list-rewards" in argv[1:]:
        return list_rewards(algo)
    from . import distributed

    try:
        cfg = build_config(algo.config_cls, argv[1:], prog=f"python -m {prog} {name}",
                           algorithm=name)
        result = run_training(prog, backend_spec, algo, cfg)
    except (ConfigError, UserError) as e:
        if not getattr(e, "quiet", False):
            print(f"error: {distributed.current().tag()}{e}", file=sys.stderr)
        return 2
    except Exception as e:
        world = distributed.current()
        if not world.peer_failure(e):
            raise
        print(f"error: {world.tag()}{distributed.peer_failure_message(e)}", file=sys.stderr,
              flush=True)
        return 1
    if not distributed.current().main:
        return 0  # rank 0 prints the summary
    summary = {"steps": result.steps, "train_loss": result.final_train_loss,
               "valid_loss": result.final_valid_loss, "run_dir": str(result.run_dir)}
    if result.test is not None:
        summary["test"] = result.test
    print(json.dumps(summary))
    if result.sample is not None:
        print(f"\n>>> {cfg.sample_prompt}\n{result.sample}")
    return 0


def list_rewards(algo) -> int:
    """``<algorithm> --list-rewards``: the rewards an online algorithm can use."""
    import dataclasses

    if "reward" not in {f.name for f in dataclasses.fields(algo.config_cls)}:
        print(f"error: --list-rewards: {algo.name} takes no reward functions (the online "
              "algorithms do: grpo, dapo, rloo, ppo...)", file=sys.stderr)
        return 2
    from rewards import format_reward_list

    print(format_reward_list())
    return 0


def load_backend_class(spec: str) -> type:
    module, _, cls = spec.partition(":")
    return getattr(importlib.import_module(module), cls)


def run_training(prog: str, backend_spec: str, algo, cfg):
    from converters.atomic import DiskFullError
    from rewards import RewardError

    from . import distributed, rundir
    from .data import DataError
    from .guards import TrainingStopped, extreme_settings
    from .model_check import ModelError

    try:  # several processes: join the launcher's group first (every rank runs this command)
        world = distributed.init(backend_spec, cfg)
    except distributed.DistributedError as e:
        raise UserError(str(e)) from None
    if world.size > 1 and world.main:
        print(world.describe(prog), file=sys.stderr, flush=True)
    model_path, model_config, tokenizer = open_model(cfg.model, cfg.chat_template, prog)
    try:  # the plans of every rank: one seeded order over the GLOBAL micro-batch
        data = algo.prepare_data(distributed.data_config(cfg, world), tokenizer)
    except (DataError, FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    for split, report in data.reports.items() if world.main else ():
        print(f"{prog}: {split}: {report}", file=sys.stderr)

    backend_cls = load_backend_class(backend_spec)
    backend_model = importlib.import_module(f"{backend_spec.split('.')[0]}.model")
    check = getattr(backend_model, "check_model", None)
    try:
        if check is not None:
            check(model_path, model_config)
        check_run_options(cfg, backend_model, model_path)
    except (ModelError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
    run, fingerprints, refused = rundir.Run.elsewhere(cfg.run_dir), {}, None
    if world.main:  # rank 0 alone owns the run dir (lock, resume checks, writes)
        try:
            fingerprints = rundir.run_fingerprints(cfg, model_path, data)
            run = rundir.open_run(cfg, backend_cls.name, algo.total_steps(cfg, data),
                                  fingerprints)
        except (ModelError, rundir.RunDirError, FileNotFoundError) as e:
            refused = str(e)
    refused = world.broadcast(refused)
    if refused:
        raise UserError(refused, quiet=not world.main)
    for warning in extreme_settings(cfg) if world.main else ():
        print(f"{prog}: warning: {warning}", file=sys.stderr)
    failed = True
    try:
        started = time.perf_counter()
        try:
            backend = backend_cls(cfg, model_path, tokenizer)
        except ModelError as e:
            raise UserError(str(e)) from None
        run.commit(config_json(cfg, {"algorithm": algo.name, "backend": prog,
                                     "model_path": str(model_path)}),
                   fingerprints)
        try:
            result = algo.train(cfg, backend, data, run.path, model_path)
            from .report import finish_run

            if world.main:
                finish_run(run.path, cfg.plots)  # plots and the run's README
        except TrainingStopped as e:  # decided on global numbers: every rank stops
            raise UserError(str(e), quiet=not world.main) from None
        except (RewardError, DiskFullError) as e:
            raise UserError(str(e)) from None
        except (FileNotFoundError, ValueError) as e:
            if "--resume" in str(e):
                raise UserError(str(e)) from None
            raise
        failed = False
    finally:
        run.close(failed)
    if world.main:
        print(f"{prog}: {result.steps} steps in {time.perf_counter() - started:.1f}s; "
              f"adapters in {run.path / 'adapters'}", file=sys.stderr)
    return result


def open_model(model: str, chat_template: str = "", prog: str = "") -> tuple[Path, dict, Any]:
    """``--model`` resolved and checked (config, weights' headers, tokenizer), before any
    backend loads it: (model dir, its config, the tokenizer with ``--chat-template``)."""
    from converters.models import resolve_model

    from .model_check import ModelError, check_model_dir

    try:
        model_path = resolve_model(model)
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise UserError(f"--model {model}: {e}") from None
    try:
        model_config = check_model_dir(model_path)
    except ModelError as e:
        raise UserError(str(e)) from None
    return model_path, model_config, load_tokenizer(model_path, chat_template, prog)


def check_run_options(cfg, backend_model, model_path: Path) -> None:
    """Options that need the model dir or the machine, checked before the model loads:
    ``--init-adapter`` (an adapter that fits the model), ``--report-to`` (packages present),
    and the backend's own (``check_options``: e.g. bitsandbytes needs CUDA)."""
    from .adapter_io import check_init_adapter
    from .model_check import ModelError
    from .tracking import check_available

    try:
        check_init_adapter(cfg, model_path)
        check_available(list(getattr(cfg, "report_to", [])))
    except ValueError as e:
        raise ModelError(str(e)) from None
    options = getattr(backend_model, "check_options", None)
    if options is not None:
        options(cfg)


def load_tokenizer(model_path: Path, chat_template: str = "", prog: str = ""):
    """The model's tokenizer (pad = eos when it has no pad), with ``--chat-template`` applied."""
    from transformers import AutoTokenizer

    from .data.templates import apply_chat_template

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise UserError(f"--model {model_path}: the tokenizer does not load "
                        f"({' '.join(str(e).split())[:300]})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template:
        for warning in apply_chat_template(tokenizer, chat_template):
            print(f"{prog or 'posttrain'}: warning: {warning}", file=sys.stderr)
    return tokenizer
