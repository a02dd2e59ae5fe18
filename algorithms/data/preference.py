"""Preference data: paired ``prompt``/``chosen``/``rejected`` (DPO family) and unpaired KTO data.

Formats (detected per example from keys and value types; one file holds one format):

- ``pref_string``: ``{"prompt": str, "chosen": str, "rejected": str}``.
- ``pref_chat``: ``{"prompt": [messages], "chosen": [messages], "rejected": [messages]}``;
  ``chosen`` / ``rejected`` are the response turns and must start with an assistant message.
- ``pref_implicit_string``: ``{"chosen": str, "rejected": str}``: the prompt is the common
  character prefix, moved back to the last whitespace inside it, so the responses start at a word
  boundary and keep their leading space (``"Q? A: four"`` / ``"Q? A: five"`` -> prompt
  ``"Q? A:"``, responses ``" four"`` / ``" five"``; BPE tokenizers attach the space to the word).
  A common prefix with no whitespace (or none at all) is ``no_common_prefix``.
- ``pref_implicit_chat``: ``{"chosen": [messages], "rejected": [messages]}``, two full
  conversations: the prompt is their common leading messages (equal as JSON objects), the
  responses are what follows and must start with an assistant turn.
- ``kto_string`` / ``kto_chat``: ``{"prompt", "completion", "label": bool}`` (unpaired).

Chat formats also take ``tools`` and ``chat_template_kwargs``; every format passes ``id`` and
``meta`` through; any other key is ``unknown_key``. Messages follow :mod:`.formats`.

Tokens, exactly as SFT's ``prompt_completion`` / ``chat_prompt_completion`` (:mod:`.tokenize`):
strings are ``tokenizer(prompt) + tokenizer(response, add_special_tokens=False) + [eos]``; chat
data renders prompt + response once, and the response tokens are those from
``render(prompt, add_generation_prompt=True)`` on, end-of-turn token included (whitespace the
template writes after it is not trained). Each side is a :class:`PromptResponse`: its
``input_ids``, ``loss_mask`` (response tokens only) and ``prompt_length``.

Truncation: with ``max_prompt_length`` a longer prompt keeps its LAST tokens (the question and
the generation header the response conditions on); then a sequence over ``max_length`` keeps its
first tokens, as in SFT. A side left with no trained token is ``fully_masked`` (file:line).

Unpaired (``kind="unpaired"``) also reads paired files: every pair becomes a desirable example
(prompt + chosen, ``label=True``) and an undesirable one (prompt + rejected, ``label=False``);
all the chosen come first in file order, then all the rejected (TRL's
``unpair_preference_dataset`` does the same per chunk). Sources read ``file:line (chosen)``.

Rules counted by ``--skip-invalid``: those of :mod:`.formats` (``invalid_json``,
``not_an_object``, ``unknown_format``, ``ambiguous_format``, ``mixed_formats``, ``missing_key``,
``wrong_type``, ``unknown_key``, ``empty_prompt``, ``empty_completion``, ``bad_message``,
``unknown_role``, ``content_not_string``, ``template_error``, ``template_not_prefix_stable``,
``fully_masked``) and ``chosen_equals_rejected``, ``no_common_prefix``,
``response_not_assistant``, ``unpaired_data`` (KTO rows given to a paired algorithm).
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .dataset import DatasetReport, pad_token_id, unwrap_tokenizer
from .formats import CHAT_PROMPT_COMPLETION, PROMPT_COMPLETION
from .preference_formats import (
    CHAT,
    CHAT_EXTRAS,
    FORMAT_NAMES,
    KINDS,
    UNPAIRED_FORMATS,
    check_preference_record,
    common_prefix_length,
    detect_preference_format,
    split_record,
)
from .records import DataError, Record
from .tokenize import tokenize_record


@dataclass(slots=True)
class PromptResponse:
    """One tokenised prompt + response: ``loss_mask`` is 1 on the response tokens only."""

    input_ids: list[int]
    loss_mask: list[int]
    prompt_length: int  # input_ids[:prompt_length] are prompt tokens
    truncated: bool = False
    prompt_truncated: bool = False
    # the response tokens (and mask) cut off at max_length, kept for KTO's KL rows, which pair
    # this response with another prompt and cut the pair once (empty when nothing was cut)
    cut_ids: list[int] = dataclasses.field(default_factory=list)
    cut_mask: list[int] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def prompt_ids(self) -> list[int]:
        return self.input_ids[: self.prompt_length]

    @property
    def response_ids(self) -> list[int]:
        return self.input_ids[self.prompt_length:]

    @property
    def response_mask(self) -> list[int]:
        return self.loss_mask[self.prompt_length:]

    def whole_response(self) -> tuple[list[int], list[int]]:
        """The response's ids and loss mask before this row was cut to ``max_length``."""
        return self.response_ids + self.cut_ids, self.response_mask + self.cut_mask


@dataclass(slots=True)
class PreferenceExample:
    """One pair: the same prompt with its ``chosen`` and ``rejected`` responses."""

    chosen: PromptResponse
    rejected: PromptResponse
    source: str

    def __len__(self) -> int:
        return max(len(self.chosen), len(self.rejected))


@dataclass(slots=True)
class UnpairedExample:
    """One KTO example: prompt + completion and ``label`` (True = desirable)."""

    sequence: PromptResponse
    label: bool
    source: str

    def __len__(self) -> int:
        return len(self.sequence)


@dataclass
class PreferenceReport(DatasetReport):
    """:class:`DatasetReport` plus prompt truncation and, for KTO, the label counts.

    ``n_examples`` counts pairs (paired) or unpaired examples; ``n_truncated`` those with a side
    cut at ``max_length``; ``n_tokens`` / ``n_loss_tokens`` add up every sequence.
    """

    kind: str = "paired"
    max_prompt_length: int | None = None
    n_prompt_truncated: int = 0
    n_desirable: int = 0
    n_undesirable: int = 0

    def __str__(self) -> str:
        text = super().__str__()[:-1]
        noun = "pairs" if self.kind == "paired" else "examples"
        text = text.replace(f"examples ({self.format})",
                            f"{noun} ({FORMAT_NAMES.get(self.format, self.format)})", 1)
        if self.max_prompt_length:
            text += (f"; {self.n_prompt_truncated:,} prompts cut to their last "
                     f"{self.max_prompt_length} tokens")
        if self.kind == "unpaired":
            text += f"; {self.n_desirable:,} desirable, {self.n_undesirable:,} undesirable"
        return text + "."


@dataclass
class PreferenceDataset:
    """Tokenised preference examples of one split, in order, with what the collators need."""

    examples: list  # list[PreferenceExample] (paired) or list[UnpairedExample] (unpaired)
    report: PreferenceReport
    kind: str
    pad_id: int
    eos_id: int | None = None
    max_length: int = 0
    max_prompt_length: int | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int):
        return self.examples[index]

    @property
    def lengths(self) -> list[int]:
        return [len(e) for e in self.examples]


def prepare_preference_dataset(path: str | Path, split: str, tokenizer: Any, cfg: Any,
                               kind: str = "paired") -> PreferenceDataset | None:
    """Tokenised ``split`` of a preference dataset; None when an optional split is absent.

    ``cfg`` needs ``max_length``; optional ``max_prompt_length`` (None/0 = off), ``skip_invalid``
    and ``packing`` (must be False: preference rows are padded, never packed). Several sources:
    :func:`.pipeline.prepare_splits` with :data:`PAIRED` / :data:`UNPAIRED`.
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: must be one of {', '.join(KINDS)}")
    from .pipeline import single_source_split

    dataset = single_source_split(path, split, tokenizer, cfg, FAMILIES[kind])
    if kind == "unpaired" and split == "train" and dataset is not None:
        check_both_labels(dataset)
    return dataset


def check_settings(cfg: Any) -> tuple[int, int | None]:
    """``(max_length, max_prompt_length or None)``, checked (DataError naming the flag)."""
    if getattr(cfg, "packing", False):
        raise DataError("--packing is not supported for preference data (chosen and rejected "
                        "rows are padded side by side); drop --packing")
    max_length = int(cfg.max_length)
    max_prompt = getattr(cfg, "max_prompt_length", None) or None
    if max_length < 2:
        raise DataError(f"--max-length={max_length}: must be >= 2 (one input and one target)")
    if max_prompt is not None and not 1 <= int(max_prompt) < max_length:
        raise DataError(f"--max-prompt-length={max_prompt}: must be in [1, --max-length "
                        f"{max_length}) so that a response token fits")
    return max_length, max_prompt


class PreferenceProcessor:
    """Validates and tokenises one preference row (picklable: sent to tokenising processes);
    the context is the source's first good row's ``(format, source)``."""

    def __init__(self, tokenizer: Any, cfg: Any, label: str, kind: str = "paired"):
        self.max_length, self.max_prompt = check_settings(cfg)
        self.after_eot = bool(getattr(cfg, "train_after_eot", False))
        self.tokenizer, self.kind = tokenizer, kind

    def __call__(self, record: Record, context: tuple | None) -> tuple[Any, tuple]:
        expected, first_source = context or (None, "")
        fmt = check_preference_record(record, self.kind, expected, first_source)
        seqs = [_tokenize_side(record, name, prompt, response, fmt, self.tokenizer,
                               self.max_length, self.max_prompt, self.after_eot)
                for name, prompt, response in split_record(record, fmt)]
        if fmt in UNPAIRED_FORMATS:
            example: Any = UnpairedExample(seqs[0], record.data["label"], record.source)
        else:
            example = PreferenceExample(seqs[0], seqs[1], record.source)
        return example, context or (fmt, record.source)


def _unpair_source(processed: Any) -> Any:
    """KTO: a source's pairs become chosen-then-rejected unpaired examples (keys follow)."""
    pairs = [(e, k) for e, k in zip(processed.examples, processed.keys)
             if isinstance(e, PreferenceExample)]
    if pairs:
        processed.examples = unpair([e for e, _ in pairs])
        processed.keys = [k for _, k in pairs] * 2
    return processed


def build_preference(examples: list, parts: list, tokenizer: Any, cfg: Any,
                     kind: str = "paired") -> PreferenceDataset:
    """The dataset of one split from its (mixed) examples and their source parts."""
    from .pipeline import parts_name, skipped_by_rule

    max_length, max_prompt = check_settings(cfg)
    tokenizer = unwrap_tokenizer(tokenizer)
    seqs = [s for e in examples for s in _sequences(e)]
    report = PreferenceReport(
        path=parts_name(parts), format="+".join(dict.fromkeys(p.format for p in parts)),
        max_length=max_length, n_examples=len(examples), n_skipped_by_rule=skipped_by_rule(parts),
        n_truncated=sum(any(s.truncated for s in _sequences(e)) for e in examples),
        n_tokens=sum(len(s) for s in seqs), n_loss_tokens=sum(sum(s.loss_mask) for s in seqs),
        skipped=[m for p in parts for m in p.messages], kind=kind, max_prompt_length=max_prompt,
        n_prompt_truncated=sum(any(s.prompt_truncated for s in _sequences(e)) for e in examples),
        n_desirable=sum(getattr(e, "label", False) is True for e in examples),
        n_undesirable=sum(getattr(e, "label", True) is False for e in examples),
    )
    return PreferenceDataset(examples, report, kind, pad_token_id(tokenizer),
                             tokenizer.eos_token_id, max_length, max_prompt)


def _families() -> dict:
    from functools import partial

    from .pipeline import Family

    def settings(cfg: Any) -> dict:
        return {**dict(zip(("max_length", "max_prompt_length"), check_settings(cfg))),
                "train_after_eot": bool(getattr(cfg, "train_after_eot", False))}

    return {kind: Family("paired" if kind == "paired" else "unpaired",
                         partial(PreferenceProcessor, kind=kind), settings,
                         lambda context: context[0] if context else "",
                         partial(build_preference, kind=kind),
                         _unpair_source if kind == "unpaired" else None)
            for kind in KINDS}


def check_both_labels(dataset: PreferenceDataset) -> None:
    """KTO's training split needs desirable and undesirable examples; a DataError otherwise."""
    labels = {e.label for e in dataset.examples}
    if labels != {True, False}:
        have = "desirable (true)" if True in labels else "undesirable (false)"
        where = dataset.report.path
        raise DataError(f"{where}: every KTO example is {have}; KTO weighs desirable against "
                        "undesirable completions, so it needs both labels (for desirable-only "
                        "data use sft)", source=where)


def unpair(pairs: list[PreferenceExample]) -> list[UnpairedExample]:
    """Each pair -> (prompt + chosen, True) and (prompt + rejected, False); chosen block first."""
    return ([UnpairedExample(p.chosen, True, f"{p.source} (chosen)") for p in pairs]
            + [UnpairedExample(p.rejected, False, f"{p.source} (rejected)") for p in pairs])


def _sequences(example: PreferenceExample | UnpairedExample) -> tuple[PromptResponse, ...]:
    if isinstance(example, PreferenceExample):
        return example.chosen, example.rejected
    return (example.sequence,)


# ---------------------------------------------------------------------------------------------
# Tokenisation


def _tokenize_side(record: Record, side: str, prompt: Any, response: Any, fmt: str,
                   tokenizer: Any, max_length: int, max_prompt: int | None,
                   after_eot: bool = False) -> PromptResponse:
    extras = {k: record.data[k] for k in CHAT_EXTRAS if k in record.data}
    view = dataclasses.replace(record, data={"prompt": prompt, "completion": response, **extras})
    sft_fmt = CHAT_PROMPT_COMPLETION if fmt in CHAT else PROMPT_COMPLETION
    example = tokenize_record(view, sft_fmt, tokenizer, "completion", sys.maxsize, after_eot)
    ids, mask = example.input_ids, example.loss_mask
    if sft_fmt == PROMPT_COMPLETION:
        n_prompt = len(tokenizer(prompt)["input_ids"])
    else:
        n_prompt = mask.index(1)  # the first token of the response span
    n_tokens, n_prompt_tokens = len(ids), n_prompt
    prompt_truncated = max_prompt is not None and n_prompt > max_prompt
    if prompt_truncated:
        cut = n_prompt - max_prompt
        ids, mask, n_prompt = ids[cut:], mask[cut:], max_prompt
    truncated = len(ids) > max_length
    cut_ids, cut_mask = ids[max(max_length, n_prompt):], mask[max(max_length, n_prompt):]
    if truncated:
        ids, mask = ids[:max_length], mask[:max_length]
        n_prompt = min(n_prompt, max_length)
    if mask:
        mask[0] = 0
    if not any(mask):
        raise record.fail("fully_masked", f'the "{side}" response is fully masked after '
                          f"truncation to {max_length} tokens (prompt {n_prompt_tokens} + "
                          f"response {n_tokens - n_prompt_tokens} tokens); raise --max-length"
                          f"{' or lower --max-prompt-length' if max_prompt else ''}, or shorten "
                          "the prompt")
    return PromptResponse(ids, mask, n_prompt, truncated, prompt_truncated, cut_ids, cut_mask)


FAMILIES = _families()
PAIRED, UNPAIRED = FAMILIES["paired"], FAMILIES["unpaired"]


# ---------------------------------------------------------------------------------------------
# Fingerprints (keys of the reference log-prob cache)

FINGERPRINT_VERSION = "posttrain-preference-v1"


def sequence_hash(input_ids: list[int], loss_mask: list[int], prompt_length: int = 0) -> str:
    """sha256 of one tokenised sequence: its ids, loss mask and prompt length."""
    h = hashlib.sha256()
    _update(h, input_ids, loss_mask, prompt_length)
    return h.hexdigest()


def dataset_fingerprint(dataset: PreferenceDataset) -> str:
    """sha256 over the settings and every example's tokens, masks and labels, in order.

    Sources (file paths) are left out, so a moved dataset keeps its cached reference log-probs;
    anything that changes a token, a mask, a label, the order or the truncation settings changes
    the fingerprint.
    """
    h = hashlib.sha256()
    h.update(f"{FINGERPRINT_VERSION}|{dataset.kind}|{dataset.max_length}|"
             f"{dataset.max_prompt_length}|{len(dataset.examples)}".encode())
    for example in dataset.examples:
        if isinstance(example, UnpairedExample):
            h.update(b"L1" if example.label else b"L0")
        for seq in _sequences(example):
            _update(h, seq.input_ids, seq.loss_mask, seq.prompt_length)
    return h.hexdigest()


def _update(h: Any, input_ids: list[int], loss_mask: list[int], prompt_length: int) -> None:
    h.update(np.array([len(input_ids), prompt_length], dtype="<i8").tobytes())
    h.update(np.asarray(input_ids, dtype="<i8").tobytes())
    h.update(np.asarray(loss_mask, dtype="<u1").tobytes())


__all__ = [
    "KINDS", "PAIRED", "UNPAIRED", "PreferenceDataset", "PreferenceExample", "PreferenceReport",
    "PromptResponse",
    "UnpairedExample", "check_preference_record", "common_prefix_length", "dataset_fingerprint",
    "detect_preference_format", "prepare_preference_dataset", "sequence_hash", "split_record",
    "unpair",
]
