"""GKD data: prompts, each with the completion the steps that do not sample train on.

Formats (one per file; every example may carry ``id`` / ``meta``, unused):

- ``prompt_completion`` / ``chat_prompt_completion`` (SFT's): ``prompt`` + ``completion``;
- ``messages``: the conversation before its LAST message is the prompt, that message (an
  assistant turn) the completion;
- prompts alone, ``{"prompt": str | [messages]}``: enough when no step uses the data's
  completions (``--lmbda 1``, or ``--seq-kd``).

Tokens exactly as SFT's (:mod:`algorithms.data.tokenize`): the prompt is what precedes the
completion's trained span (for chat data, the template rendered with the generation prompt:
what the sampler is given), the completion runs to its last trained token (the EOS or
end-of-turn token included, whitespace the template writes after it not). A prompt must leave
``--max-completion-length`` tokens inside ``--max-length`` (``prompt_too_long``); a longer data
completion is cut to fit (counted in the report). Rules counted by ``--skip-invalid``: those of
:mod:`algorithms.data.formats`, ``no_prompt`` (a ``text`` example), ``last_turn_not_assistant``,
``completion_required`` (a prompt alone when the data's completions are needed),
``prompt_too_long``.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from ..data.dataset import unwrap_tokenizer
from ..data.formats import (
    CHAT_PROMPT_COMPLETION,
    MESSAGES,
    PASSTHROUGH_KEYS,
    PROMPT_COMPLETION,
    TEXT,
    _check_messages,
    check_record,
)
from ..data.records import DataError, Record, describe
from ..data.tokenize import tokenize_record
from ..rl.data import PromptDataset, PromptExample, _tokenize

PROMPT_ONLY = "prompt_only"
CHAT_EXTRAS = ("tools", "chat_template_kwargs")


@dataclasses.dataclass
class DistillExample(PromptExample):
    completion_ids: list[int] | None = None  # the data's completion (None: prompt alone)
    completion_truncated: bool = False


@dataclasses.dataclass
class DistillReport:
    path: str
    format: str
    n_examples: int
    n_truncated: int
    max_prompt_tokens: int
    n_skipped_by_rule: dict[str, int]
    skipped: list[str]

    def __str__(self) -> str:
        skipped = sum(self.n_skipped_by_rule.values())
        by_rule = ", ".join(f"{k}: {v}" for k, v in self.n_skipped_by_rule.items())
        extra = f"; skipped {skipped} ({by_rule})" if skipped else ""
        cut = f"; {self.n_truncated} completions cut to fit" if self.n_truncated else ""
        return (f"{self.path}: {self.n_examples} examples ({self.format}; longest prompt "
                f"{self.max_prompt_tokens} tokens){cut}{extra}")


class DistillProcessor:
    """Validates and tokenises one distillation row (picklable: sent to tokenising processes);
    the context is ``[format, source]`` of the source's first good row (one format per source:
    ``mixed_formats``)."""

    def __init__(self, tokenizer: Any, cfg: Any, label: str):
        self.tokenizer = unwrap_tokenizer(tokenizer)
        self.max_length = int(cfg.max_length)
        self.budget = self.max_length - int(cfg.max_completion_length)
        self.needs_completions = bool(cfg.needs_dataset_completions)
        self.lmbda, self.train_after_eot = cfg.lmbda, cfg.train_after_eot

    def __call__(self, record: Record, first: list | None) -> tuple[DistillExample, list]:
        if record.error is not None:
            raise record.error
        first = list(first) if first else [None, ""]
        fmt = _format(record, first)
        if fmt == PROMPT_ONLY:
            if self.needs_completions:
                raise record.fail("completion_required", "a prompt alone, but steps without "
                                  "sampling train on the data's completions (--lmbda "
                                  f"{self.lmbda} < 1 without --seq-kd); add a \"completion\", "
                                  "or use --lmbda 1 or --seq-kd")
            base = _tokenize(record, self.tokenizer, self.budget)
            return DistillExample(base.source, base.prompt, base.prompt_ids, {}), first
        return _with_completion(record, fmt, self.tokenizer, self.budget, self.max_length,
                                self.train_after_eot), first


def build_distill(examples: list[DistillExample], parts: list, tokenizer: Any,
                  cfg: Any) -> PromptDataset:
    from ..data.pipeline import parts_name, skipped_by_rule

    formats = sorted({p.format for p in parts})
    report = DistillReport(parts_name(parts), "/".join(formats), len(examples),
                           sum(e.completion_truncated for e in examples),
                           max(len(e.prompt_ids) for e in examples), skipped_by_rule(parts),
                           [m for p in parts for m in p.messages])
    return PromptDataset(examples, report)


def _family() -> Any:
    from ..data.pipeline import Family

    return Family("distill", DistillProcessor,
                  lambda cfg: {"max_length": int(cfg.max_length),
                               "max_completion_length": int(cfg.max_completion_length),
                               "needs_completions": bool(cfg.needs_dataset_completions),
                               "train_after_eot": bool(cfg.train_after_eot)},
                  lambda context: context[0] if context else "", build_distill,
                  what="examples", layout="sft")


DISTILL = _family()


def prepare_distill_dataset(path: str | Path, split: str, tokenizer: Any,
                            cfg: Any) -> PromptDataset | None:
    """The validated, tokenised examples of ``split`` of one path (a :class:`PromptDataset` of
    :class:`DistillExample`); None when an optional split is absent. Several sources, mixing
    and hold-out: :func:`prepare_data`."""
    from ..data.pipeline import single_source_split

    return single_source_split(path, split, tokenizer, cfg, DISTILL)


def _format(record: Record, first: list) -> str:
    data = record.data
    if set(data) - set(PASSTHROUGH_KEYS) == {"prompt"}:
        fmt = PROMPT_ONLY
        prompt = data["prompt"]
        if isinstance(prompt, list):
            _check_messages(record, prompt, "prompt")
        elif not isinstance(prompt, str) or not prompt.strip():
            raise record.fail("empty_prompt" if isinstance(prompt, str) else "wrong_type",
                              f'"prompt" must be a non-empty string or a message list; got '
                              f"{describe(prompt)}")
        if first[0] not in (None, PROMPT_ONLY):
            raise record.fail("mixed_formats", f"a prompt alone, but the file's first example "
                              f"({first[1]}) is {first[0]}; one file holds one format")
    else:
        expected = None if first[0] == PROMPT_ONLY else first[0]
        if first[0] == PROMPT_ONLY:
            raise record.fail("mixed_formats", f"this example has a completion but the file's "
                              f"first example ({first[1]}) is a prompt alone; one file holds "
                              "one format")
        fmt = check_record(record, expected, first[1])
        if fmt == TEXT:
            raise record.fail("no_prompt", 'a "text" example has no prompt to sample from; use '
                              '"prompt"/"completion" or "messages"')
    if first[0] is None:
        first[0], first[1] = fmt, record.source
    return fmt


def _with_completion(record: Record, fmt: str, tokenizer: Any, budget: int, max_length: int,
                     train_after_eot: bool) -> DistillExample:
    data = record.data
    prompt, completion = (data.get("prompt"), data.get("completion"))
    if fmt == MESSAGES:
        messages = data["messages"]
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise record.fail("last_turn_not_assistant", "the last message must be the "
                              "assistant turn to distil, after at least one other message; got "
                              f"roles {', '.join(m['role'] for m in messages)}")
        prompt, completion = messages[:-1], messages[-1:]
    sft_fmt = PROMPT_COMPLETION if fmt == PROMPT_COMPLETION else CHAT_PROMPT_COMPLETION
    extras = {k: data[k] for k in CHAT_EXTRAS if k in data}
    view = Record(record.file, record.line, {"prompt": prompt, "completion": completion,
                                             **extras})
    example = tokenize_record(view, sft_fmt, tokenizer, "completion", sys.maxsize,
                              train_after_eot)
    ids, mask = example.input_ids, example.loss_mask
    start = len(tokenizer(prompt)["input_ids"]) if sft_fmt == PROMPT_COMPLETION \
        else mask.index(1)
    end = len(mask) - mask[::-1].index(1)  # after the last trained token
    if start > budget:
        raise record.fail("prompt_too_long", f"the prompt is {start} tokens; --max-length minus "
                          f"--max-completion-length leaves {budget}")
    room = max_length - start
    completion_ids = ids[start:end][:room]
    return DistillExample(record.source, prompt, ids[:start], {}, completion_ids,
                          end - start > room)


def check_teacher(cfg: Any, tokenizer: Any) -> None:
    """The teacher exists and shares the student's tokenizer and vocabulary size: GKD compares
    the two next-token distributions token by token. A DataError names ``--teacher``."""
    import json

    from transformers import AutoTokenizer

    from converters.models import resolve_model

    try:
        teacher = resolve_model(cfg.teacher)
        student = resolve_model(cfg.model)
        theirs = AutoTokenizer.from_pretrained(str(teacher))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise DataError(f"--teacher {cfg.teacher}: {e}") from None
    mine, other = unwrap_tokenizer(tokenizer).get_vocab(), theirs.get_vocab()
    if mine != other:
        differ = sorted(set(mine.items()) ^ set(other.items()), key=lambda kv: kv[1])
        token, index = differ[0] if differ else ("?", -1)
        raise DataError(f"--teacher {cfg.teacher}: its tokenizer is not the student's ({len(other)} "
                        f"vs {len(mine)} tokens; they differ at {token!r} (id {index})); GKD "
                        "compares the two models' distributions token by token, so both need "
                        "the same tokenizer")
    sizes = []
    for directory in (student, teacher):
        config = json.loads((Path(directory) / "config.json").read_text())
        sizes.append(config.get("vocab_size", config.get("text_config", {}).get("vocab_size")))
    if sizes[0] != sizes[1]:
        raise DataError(f"--teacher {cfg.teacher}: its vocab_size is {sizes[1]}, the student's "
                        f"{sizes[0]}; GKD needs both output layers over one vocabulary")


def prepare_data(cfg: Any, tokenizer: Any) -> Any:
    """The teacher checked, then the validated splits, before any model loads."""
    from ..data import PreparedData
    from ..data.pipeline import prepare_splits

    check_teacher(cfg, tokenizer)
    sets = prepare_splits(cfg, tokenizer, DISTILL)
    return PreparedData(sets["train"], sets["valid"],
                        {s: ds.split_report for s, ds in sets.items() if ds is not None},
                        test=sets["test"])
