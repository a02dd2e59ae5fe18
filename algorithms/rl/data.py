"""Prompt datasets for online RL: a ``prompt`` column plus any columns the rewards read.

Each JSONL line is an object with ``prompt``:

- a string: a *standard* prompt, tokenised as it is (with the tokenizer's usual BOS), no chat
  template, as for ``text`` / ``prompt_completion`` data;
- a message list: a *conversational* prompt, rendered by the chat template with
  ``add_generation_prompt=True``; when the last message is an assistant turn, the template
  continues that turn instead (``continue_final_message``), so a completion can be seeded.

Every other key is a column handed to the reward functions by name (``answer``, ``tests``...),
aligned with the completions; ``id`` and ``meta`` are kept too. Columns must be the same on every
line (a reward would otherwise get ``None`` silently) and may not use the names the reward
contract reserves (``prompts``, ``completions``, ``completion_ids``, ``step``).

Rules (``--skip-invalid`` counts them by name): ``invalid_json``, ``not_an_object``,
``missing_key``, ``wrong_type``, ``empty_prompt``, ``bad_message`` / ``unknown_role`` /
``content_not_string``, ``reserved_column``, ``missing_column``, ``unknown_column``,
``template_error``, ``prompt_too_long`` (prompt tokens + ``--max-completion-length`` must fit in
``--max-length``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..data.batching import epoch_rng
from ..data.formats import _check_messages
from ..data.records import (
    DataError,
    Record,
    describe,
)

RESERVED_COLUMNS = ("prompts", "completions", "completion_ids", "step")


@dataclasses.dataclass
class PromptExample:
    source: str               # file:line
    prompt: Any               # the raw prompt (string or message list), as rewards see it
    prompt_ids: list[int]     # tokens fed to the sampler
    columns: dict[str, Any]   # every other key of the line


@dataclasses.dataclass
class PromptReport:
    path: str
    n_examples: int
    n_skipped_by_rule: dict[str, int]
    columns: list[str]
    max_prompt_tokens: int
    skipped: list[str]

    def __str__(self) -> str:
        skipped = sum(self.n_skipped_by_rule.values())
        by_rule = ", ".join(f"{k}: {v}" for k, v in self.n_skipped_by_rule.items())
        extra = f"; skipped {skipped} ({by_rule})" if skipped else ""
        cols = ", ".join(self.columns) or "none"
        return (f"{self.path}: {self.n_examples} prompts (longest {self.max_prompt_tokens} "
                f"tokens); reward columns: {cols}{extra}")


@dataclasses.dataclass
class PromptDataset:
    examples: list[PromptExample]
    report: PromptReport

    def __len__(self) -> int:
        return len(self.examples)


def prepare_prompt_dataset(path: str | Path, split: str, tokenizer: Any,
                           cfg: Any) -> PromptDataset | None:
    """The validated, tokenised prompts of ``split``; None when an optional split is absent.

    Several sources, mixing and hold-out: ``algorithms.data.pipeline.prepare_splits`` with
    :data:`PROMPTS`."""
    from ..data.pipeline import single_source_split

    return single_source_split(path, split, tokenizer, cfg, PROMPTS)


def prompt_budget(cfg: Any) -> int:
    """Tokens a prompt may use: ``--max-length`` minus ``--max-completion-length``."""
    budget = int(cfg.max_length) - int(cfg.max_completion_length)
    if budget < 1:
        raise DataError(f"--max-length {cfg.max_length} leaves no room for a prompt with "
                        f"--max-completion-length {cfg.max_completion_length}; raise --max-length")
    return budget


class PromptProcessor:
    """Validates and tokenises one prompt row (picklable: sent to tokenising processes); the
    context is the source's first good row (every row needs its columns)."""

    def __init__(self, tokenizer: Any, cfg: Any, label: str):
        self.tokenizer, self.budget = tokenizer, prompt_budget(cfg)

    def __call__(self, record: Record, first: Record | None) -> tuple[PromptExample, Record]:
        if record.error is not None:
            raise record.error
        _check_prompt_record(record, first)
        return _tokenize(record, self.tokenizer, self.budget), first or record


def build_prompts(examples: list[PromptExample], parts: list, tokenizer: Any,
                  cfg: Any) -> PromptDataset:
    """The prompt set of one split; every source must give the rewards the same columns."""
    columns = sorted(examples[0].columns)
    for part in parts:
        have = sorted(part.examples[0].columns) if part.examples else columns
        if have != columns:
            raise DataError(f"{part.label}: its columns ({', '.join(have) or 'none'}) differ from "
                            f"{parts[0].label}'s ({', '.join(columns) or 'none'}); mixed prompt "
                            "sources must give the reward functions the same columns (rename "
                            "with columns: in the YAML source list)", source=part.label)
    from ..data.pipeline import parts_name, skipped_by_rule

    report = PromptReport(parts_name(parts), len(examples), skipped_by_rule(parts), columns,
                          max(len(e.prompt_ids) for e in examples),
                          [m for p in parts for m in p.messages])
    return PromptDataset(examples, report)


def _check_prompt_record(record: Record, first: Record | None) -> None:
    data = record.data
    if "prompt" not in data:
        raise record.fail("missing_key", 'each line needs a "prompt" (a string or a message '
                          f"list); got keys {sorted(data)}")
    prompt = data["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise record.fail("empty_prompt", f'"prompt" is empty; got {describe(prompt)}')
    elif isinstance(prompt, list):
        _check_messages(record, prompt, "prompt")
    else:
        raise record.fail("wrong_type", f'"prompt" must be a string or a message list; got '
                          f"{describe(prompt)}")
    for key in data:
        if key in RESERVED_COLUMNS:
            raise record.fail("reserved_column", f"column {key!r} clashes with an argument every "
                              f"reward function receives ({', '.join(RESERVED_COLUMNS)}); "
                              "rename it")
    if first is not None:
        missing = sorted(set(first.data) - set(data))
        if missing:
            raise record.fail("missing_column", f"no {missing[0]!r} column, which "
                              f"{first.source} has (every line needs the same columns)")
        extra = sorted(set(data) - set(first.data))
        if extra:
            raise record.fail("unknown_column", f"column {extra[0]!r} is not on "
                              f"{first.source} (every line needs the same columns)")


def _tokenize(record: Record, tokenizer: Any, budget: int) -> PromptExample:
    prompt = record.data["prompt"]
    if isinstance(prompt, str):
        ids = list(tokenizer(prompt)["input_ids"])
    else:
        if not getattr(tokenizer, "chat_template", None):
            raise record.fail("template_error", "a message-list prompt needs a tokenizer with a "
                              "chat template; this one has none (give one with --chat-template, "
                              "or use a string prompt)")
        continues = prompt[-1]["role"] == "assistant"
        try:
            text = tokenizer.apply_chat_template(prompt, tokenize=False,
                                                 add_generation_prompt=not continues,
                                                 continue_final_message=continues)
        except Exception as e:  # noqa: BLE001 - jinja errors, raise_exception() in templates
            raise record.fail("template_error", f"the chat template failed: {e}") from None
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if len(ids) > budget:
        raise record.fail("prompt_too_long", f"the prompt is {len(ids)} tokens; --max-length "
                          f"minus --max-completion-length leaves {budget}")
    columns = {k: v for k, v in record.data.items() if k != "prompt"}
    return PromptExample(record.source, prompt, ids, columns)


class PromptStream:
    """Prompts in a seeded order, epoch after epoch: the same (seed, cursor) gives the same
    prompts, so a resumed run samples what an uninterrupted one would."""

    def __init__(self, dataset: PromptDataset, seed: int, epoch: int = 0, index: int = 0):
        self.dataset, self.seed = dataset, seed
        self.epoch, self.index = epoch, index
        self._order = self._permutation(epoch)

    def _permutation(self, epoch: int) -> list[int]:
        return [int(i) for i in epoch_rng(self.seed, epoch).permutation(len(self.dataset))]

    def take(self, n: int) -> list[PromptExample]:
        return [self.dataset.examples[i] for i in self._next(n)]

    def _next(self, n: int) -> Iterator[int]:
        for _ in range(n):
            if self.index >= len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            self.index += 1
            yield self._order[self.index - 1]

    @property
    def cursor(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    @property
    def fractional_epoch(self) -> float:
        return self.epoch + self.index / max(1, len(self.dataset))


def prepare_data(cfg: Any, tokenizer: Any) -> Any:
    """Validated prompt splits and the run's reward functions, before any model loads."""
    from rewards import RewardError

    from ..data import PreparedData
    from .scoring import load_rewards

    try:
        rewards = load_rewards(cfg)
    except RewardError as e:
        raise DataError(f"--reward: {e}") from None
    from ..data.pipeline import prepare_splits

    sets = prepare_splits(cfg, tokenizer, PROMPTS)
    for ds in sets.values():
        if ds is not None:
            check_reward_columns(rewards, ds.report)
    return PreparedData(sets["train"], sets["valid"],
                        {s: ds.split_report for s, ds in sets.items() if ds is not None},
                        extras={"rewards": rewards}, test=sets["test"])


def _prompt_family() -> Any:
    from ..data.pipeline import Family

    return Family("prompt", PromptProcessor, lambda cfg: {"budget": prompt_budget(cfg)},
                  lambda first: "prompt", build_prompts, what="prompts")


PROMPTS = _prompt_family()


def check_reward_columns(rewards: list, report: PromptReport) -> None:
    """A DataError when a reward needs a column the split lacks (``math_answer`` without
    ``answer`` would score every completion None and train on nothing)."""
    from rewards.contract import required_columns

    present = ["prompt", *report.columns]
    for spec, fn in rewards:
        missing = [c for c in required_columns(fn) if c not in present] if fn else []
        if missing:
            raise DataError(f"--reward {spec}: needs the column {missing[0]!r}, which "
                            f"{report.path} lacks (columns present: {', '.join(present)})")
