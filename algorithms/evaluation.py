"""Evaluating a split: the training loop's validation and test runs and the ``evaluate`` verb.

One function per kind, used by all three, so ``evaluate`` on a split prints exactly the numbers
the training loop logged for it:

- offline algorithms (:func:`offline_metrics`): the algorithm's own loss and metrics over the
  split, weighted as in training (token or sequence means); SFT's NLL also as ``perplexity``;
  preference losses with ``rewards/accuracy``, ``rewards/margin``... as their losses report;
- online algorithms: the mean reward (total and per function) of one completion sampled per
  prompt with a fixed seed (:func:`algorithms.rl.trainer.evaluate_rewards`; online DPO, XPO and
  Nash-MD too); GKD: the divergence to the teacher on the split's completions (its pipeline's
  ``evaluate``).

``python -m mlx_ft evaluate <algorithm> --data DIR [--adapter DIR] [--split test]`` (or
``evaluate --run runs/x``: the run's config.json and adapters) prints a JSON object. With
``--adapter`` the policy is the base with that adapter (either format); the reference of DPO /
KTO stays the run's starting point: the base, or the base with the run's ``--init-adapter``,
whose log-probs are then computed first by a model holding that adapter, which is freed before
the adapted model loads (never two copies at once).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import sys
from pathlib import Path
from typing import Any

SPLITS = ("test", "valid", "train")


def offline_metrics(cfg: Any, backend: Any, loss: Any, plan: Any, prepare: Any,
                    normaliser: str) -> dict | None:
    """The loss and metrics of an offline algorithm over ``plan`` (``--eval-batches`` of it)."""
    from .loop import evaluate

    record = evaluate(backend, loss, plan, cfg.eval_batches, prepare, normaliser)
    if record is not None and getattr(cfg, "loss_type", None) == "nll":
        record["perplexity"] = math.exp(min(record["loss"], 700.0))
    return record


class _Recorder:
    """A backend whose reference log-probs are its own policy's (a model holding the run's
    initial adapter), recorded in call order."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.recorded = inner, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def reference_per_token_logps(self, batch: dict) -> Any:
        self.recorded.append(self.inner.per_token_logps(batch))
        return self.recorded[-1]


class _Replay:
    """A backend whose reference log-probs are replayed from a :class:`_Recorder`."""

    def __init__(self, inner: Any, recorded: list) -> None:
        self.inner, self.recorded = inner, list(recorded)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def reference_per_token_logps(self, batch: dict) -> Any:
        return self.recorded.pop(0)


def evaluate_run(prog: str, backend_spec: str, algo: Any, cfg: Any, adapter_dir: str | None,
                 split: str | None) -> dict:
    """What ``evaluate`` prints (module docstring)."""
    from .adapter_io import adopt_settings, read_adapter_weights
    from .cli import UserError, check_run_options, load_backend_class, open_model
    from .data import DataError
    from .data.templates import template_for
    from .model_check import ModelError

    model_path, model_config, tokenizer = open_model(
        cfg.model, template_for(cfg.chat_template, adapter_dir), prog)
    try:
        data = algo.prepare_data(cfg, tokenizer)
    except (DataError, FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    present = {"test": data.test, "valid": data.valid, "train": data.train}
    split = split or next(s for s in SPLITS if present[s] is not None)
    if present[split] is None:
        raise UserError(f"--split {split}: {cfg.data} has no {split} split")
    online = algo.loop.__name__ == "online_loop"
    initial = getattr(cfg, "init_adapter", "")
    if hasattr(cfg, "precompute_ref"):
        cfg.precompute_ref = False  # the cache holds the training reference; computed here
    backend_cls = load_backend_class(backend_spec)
    backend_model = sys.modules[backend_cls.__module__.rsplit(".", 1)[0] + ".model"]
    try:
        adapter = read_adapter_weights(adapter_dir, "--adapter", model_path) \
            if adapter_dir else None
        if hasattr(backend_model, "check_model"):
            backend_model.check_model(model_path, model_config)
        check_run_options(dataclasses.replace(cfg, report_to=[]), backend_model, model_path)
        recorded = None
        if adapter is not None and initial and not online \
                and getattr(cfg, "needs_reference", False) and not cfg.reference_model:
            recorded = _reference_pass(algo, cfg, backend_cls, model_path, tokenizer, data,
                                       present[split])
        if adapter is not None:
            adopt_settings(cfg, adapter)
            cfg.init_adapter = ""
        backend = backend_cls(cfg, model_path, tokenizer)
        if adapter is not None:
            backend.load_adapter_weights(adapter.weights)
    except (ModelError, ValueError) as e:
        raise UserError(str(e)) from None
    metrics = _metrics(algo, cfg, backend if recorded is None else _Replay(backend, recorded),
                       data, present[split], model_path, online)
    report = data.reports.get(split)
    return {"algorithm": algo.name, "backend": prog, "split": split,
            "data": getattr(report, "path", cfg.data), "model": str(model_path),
            "adapter": adapter_dir or None, "reference_adapter": initial or None,
            "metrics": metrics}


def _metrics(algo: Any, cfg: Any, backend: Any, data: Any, split_data: Any, model_path: Path,
             online: bool) -> dict | None:
    if online:  # the algorithm's own evaluation: rewards, or GKD's divergence to the teacher
        from .rl.trainer import PolicyGradient

        pipeline = algo.make_pipeline(cfg) or PolicyGradient()
        scorer = pipeline.scorer(cfg, data, backend)
        return pipeline.evaluate(cfg, backend, split_data, scorer, 0)
    prepare = algo.make_prepare(cfg, backend, data, model_path)
    return offline_metrics(cfg, backend, algo.make_loss(cfg), split_data, prepare,
                           algo.normaliser)


def _reference_pass(algo: Any, cfg: Any, backend_cls: type, model_path: Path, tokenizer: Any,
                    data: Any, plan: Any) -> list:
    """The reference log-probs of the whole evaluation, from a model holding the run's initial
    adapter (freed before returning)."""
    recorder = _Recorder(backend_cls(cfg, model_path, tokenizer))
    _metrics(algo, cfg, recorder, data, plan, model_path, False)
    recorded = recorder.recorded
    del recorder
    gc.collect()
    return recorded


def main(prog: str, backend_spec: str, argv: list[str]) -> int:
    """``python -m <prog> evaluate [<algorithm>] [--run DIR] [--adapter DIR] [--split S]
    [--out FILE] [the algorithm's flags]``."""
    from converters.cli import ArgumentParser

    from .cli import UserError
    from .config import ConfigError, build_config, load_yaml
    from .registry import algorithms

    parser = ArgumentParser(prog=f"python -m {prog} evaluate", description=__doc__.split(
        "\n\n")[1], epilog="Every flag of the algorithm is accepted too (python -m "
        f"{prog} <algorithm> --help).")
    parser.add_argument("--run", help="a run dir: its config.json and adapters/")
    parser.add_argument("--adapter", help="adapter dir (mlx-lm or PEFT); none = the base model")
    parser.add_argument("--split", choices=SPLITS,
                        help="which split (default: test if present, else valid, else train)")
    parser.add_argument("--out", help="also write the JSON result to this file")
    name = argv[0] if argv and not argv[0].startswith("-") else None
    args, rest = parser.parse_known_args(argv[1:] if name else argv)
    registry = algorithms()
    try:
        adapter = args.adapter
        if args.run:
            record = Path(args.run) / "config.json"
            if not record.is_file():
                raise ConfigError(f"--run {args.run}: no config.json (not a run dir)")
            rest = ["--config", str(record), *rest] if "--config" not in rest else rest
            adapters = Path(args.run) / "adapters"
            if adapter is None and (adapters / "adapter_config.json").is_file():
                adapter = str(adapters)
            elif adapter is None and (adapters / "config.json").is_file():
                rest = [*rest, "--model", str(adapters)]  # a full fine-tune: a model dir
        if name is None and "--config" in rest:
            name = load_yaml(rest[rest.index("--config") + 1]).get("algorithm")
        if name not in registry:
            raise ConfigError(f"evaluate: name the algorithm (one of {', '.join(registry)}) or "
                              "give --run / --config with a run's config.json"
                              + (f"; got {name!r}" if name else ""))
        cfg = build_config(registry[name].config_cls, rest,
                           prog=f"python -m {prog} evaluate {name}", algorithm=name)
        result = evaluate_run(prog, backend_spec, registry[name], cfg, adapter, args.split)
        text = json.dumps(result, indent=2) + "\n"
        if args.out:
            from converters.atomic import write_text_atomically

            write_text_atomically(args.out, text)
    except (ConfigError, UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text, end="")
    return 0
