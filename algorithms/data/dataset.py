"""The SFT data family: validate, tokenise, truncate, report.

``prepare_dataset(path, split, tokenizer, cfg)`` reads one split of one source (see
:mod:`.readers`), checks every example against its format's rules (:mod:`.formats`), tokenises
it and builds its loss mask (:mod:`.tokenize`); :data:`SFT` is the family
:func:`.pipeline.prepare_splits` uses for several sources, mixing and hold-out. Without
``cfg.skip_invalid`` the first broken example raises a :class:`DataError` naming ``file:line``
(or ``source[row]``); with it, broken examples are counted by rule and left out, and the
:class:`DatasetReport` says so. File-level problems (no train file, a tokenizer with no chat
template for chat data, ``--train-on completion`` on text) always raise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .formats import FORMAT_NAMES, TEXT, check_record
from .records import DataError, Record
from .tokenize import TRAIN_ON, Example, tokenize_record


@dataclass
class DatasetReport:
    """What preparing one split did: kept, skipped (by rule), truncated, token counts."""

    path: str
    format: str
    max_length: int
    n_examples: int = 0
    n_skipped_by_rule: dict[str, int] = field(default_factory=dict)
    n_truncated: int = 0
    n_tokens: int = 0
    n_loss_tokens: int = 0
    skipped: list[str] = field(default_factory=list)  # the skipped examples' error messages

    @property
    def n_skipped(self) -> int:
        return sum(self.n_skipped_by_rule.values())

    def __str__(self) -> str:
        share = 100.0 * self.n_loss_tokens / max(self.n_tokens, 1)
        text = (f"{self.n_examples:,} examples ({FORMAT_NAMES.get(self.format, self.format)}) "
                f"from {self.path}: {self.n_tokens:,} tokens, {self.n_loss_tokens:,} carry loss "
                f"({share:.1f}%); {self.n_truncated:,} truncated to {self.max_length} tokens")
        if self.n_skipped:
            rules = ", ".join(f"{rule} {n}" for rule, n in sorted(self.n_skipped_by_rule.items()))
            text += (f"; skipped {self.n_skipped:,} invalid examples ({rules}), the first: "
                     f"{self.skipped[0]}")
        return text + "."


@dataclass
class TokenizedDataset:
    """The tokenised examples of one split, in file order, with the ids the collator needs."""

    examples: list[Example]
    report: DatasetReport
    pad_id: int
    eos_id: int | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]

    @property
    def lengths(self) -> list[int]:
        return [len(e) for e in self.examples]


def prepare_dataset(path: str | Path, split: str, tokenizer: Any,
                    cfg: Any) -> TokenizedDataset | None:
    """Tokenised ``split`` ("train" / "valid") of the dataset at ``path`` (any source
    :mod:`.readers` reads); None when an optional split is absent.

    ``cfg`` needs ``max_length`` and may have ``train_on`` (default ``auto``), ``skip_invalid``
    (default False), ``data_format`` and ``columns``, as :class:`algorithms.config.TrainConfig`
    does. Several sources, mixing and hold-out: :func:`.pipeline.prepare_splits` with
    :data:`SFT`.
    """
    from .pipeline import single_source_split

    return single_source_split(path, split, tokenizer, cfg, SFT)


def check_settings(cfg: Any) -> tuple[int, str]:
    """``(max_length, train_on)``, checked (DataError naming the flag)."""
    max_length = int(cfg.max_length)
    train_on = getattr(cfg, "train_on", "auto")
    if train_on not in TRAIN_ON:
        raise DataError(f"--train-on={train_on!r}: must be one of {', '.join(TRAIN_ON)}")
    if max_length < 2:
        raise DataError(f"--max-length={max_length}: must be >= 2 (one input and one target)")
    return max_length, train_on


class SFTProcessor:
    """Validates and tokenises one SFT row (sent to tokenising processes: keep it picklable).

    The context is the source's first good row's ``(format, source)``: one source holds one
    format (rule ``mixed_formats``)."""

    def __init__(self, tokenizer: Any, cfg: Any, label: str):
        self.max_length, self.train_on = check_settings(cfg)
        self.after_eot = bool(getattr(cfg, "train_after_eot", False))
        self.tokenizer, self.label = tokenizer, label

    def __call__(self, record: Record, context: tuple | None) -> tuple[Example, tuple]:
        expected, first_source = context or (None, "")
        fmt = check_record(record, expected, first_source)
        if context is None:
            context = (fmt, record.source)
            if self.train_on == "completion" and fmt == TEXT:
                raise DataError(f"{self.label}: --train-on completion needs prompt/completion or "
                                "messages data; this file is text (use --train-on auto or "
                                "all)", source=self.label)
        return tokenize_record(record, fmt, self.tokenizer, self.train_on,
                               self.max_length, self.after_eot), context


def build_sft(examples: list[Example], parts: list, tokenizer: Any,
              cfg: Any) -> TokenizedDataset:
    """The dataset of one split from its (mixed) examples and the source parts they came from."""
    from .pipeline import parts_name, skipped_by_rule

    max_length, _ = check_settings(cfg)
    tokenizer = unwrap_tokenizer(tokenizer)
    report = DatasetReport(
        path=parts_name(parts), format="+".join(dict.fromkeys(p.format for p in parts)),
        max_length=max_length, n_examples=len(examples), n_skipped_by_rule=skipped_by_rule(parts),
        n_truncated=sum(e.truncated for e in examples),
        n_tokens=sum(len(e) for e in examples),
        n_loss_tokens=sum(e.num_loss_tokens for e in examples),
        skipped=[m for p in parts for m in p.messages],
    )
    return TokenizedDataset(examples, report, pad_token_id(tokenizer), tokenizer.eos_token_id)


def _sft_family():
    from .pipeline import Family

    return Family("sft", SFTProcessor,
                  lambda cfg: {**dict(zip(("max_length", "train_on"), check_settings(cfg))),
                               "train_after_eot": bool(getattr(cfg, "train_after_eot", False))},
                  lambda context: context[0] if context else "", build_sft)


def pad_token_id(tokenizer: Any) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS token."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError("the tokenizer has neither a pad nor an eos token; cannot pad batches")
    return int(pad)


def render_prompt(tokenizer: Any, user_message: str) -> list[int]:
    """Token ids of one user turn ready for generation.

    With a chat template: ``render([{"role": "user", ...}], add_generation_prompt=True)``
    tokenised without extra special tokens (the template writes them); without one: the plain
    tokens of ``user_message`` (with the tokenizer's usual BOS, as for ``text`` data).
    """
    tokenizer = unwrap_tokenizer(tokenizer)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": user_message}],
                                             tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(user_message)["input_ids"])


def unwrap_tokenizer(tokenizer: Any) -> Any:
    """The Hugging Face tokenizer inside mlx-lm's ``TokenizerWrapper`` (or the tokenizer itself)."""
    if type(tokenizer).__name__ == "TokenizerWrapper":
        return tokenizer._tokenizer
    return tokenizer


SFT = _sft_family()
